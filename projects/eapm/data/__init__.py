from .register import (  # noqa: F401
    EMBEDDED_NAMES,
    register_coco_json,
    register_embedded,
    register_from_config,
)
