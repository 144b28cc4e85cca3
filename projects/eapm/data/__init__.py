from .register import (  # noqa: F401
    EMBEDDED_NAMES,
    check_category_counts,
    check_data_config,
    register_coco_json,
    register_embedded,
    register_from_config,
    require_trainable,
)
from .validate import DatasetError, DatasetFileNotFoundError, check_coco_dataset  # noqa: F401
