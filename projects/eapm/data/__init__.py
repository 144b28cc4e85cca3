from .register import EMBEDDED_NAMES, register_coco_json, register_embedded, register_from_config  # noqa: F401
