"""Dataset registration: the embedded eapm_shapes splits and any COCO-json dataset.

COCO 2017 (``coco_2017_train`` / ``coco_2017_val`` / ``coco_2017_test-dev``) comes
from detectron2's builtin registration under ``$DETECTRON2_DATASETS/coco``.
"""

from __future__ import annotations

import functools
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from . import shapes

__all__ = ["register_embedded", "register_coco_json", "register_from_config", "EMBEDDED_NAMES"]

EMBEDDED_NAMES = tuple(f"eapm_shapes_{s.name}" for s in shapes.SPLITS)


def _load_embedded(root: str, split: str):
    root = shapes.ensure_generated(root)
    return load_coco_json(
        os.path.join(root, "annotations", f"instances_{split}.json"),
        os.path.join(root, split),
        f"eapm_shapes_{split}",
    )


def register_embedded(root: str | None = None) -> None:
    """Register ``eapm_shapes_train`` / ``eapm_shapes_val``; the data is generated on
    first use. Re-registering with another root replaces the previous registration."""
    root = os.path.abspath(root or shapes.default_root())
    for spec in shapes.SPLITS:
        name = f"eapm_shapes_{spec.name}"
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("dataset_root", None) == root:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_load_embedded, root, spec.name))
        MetadataCatalog.get(name).set(
            thing_classes=list(shapes.CLASSES),
            json_file=os.path.join(root, "annotations", f"instances_{spec.name}.json"),
            image_root=os.path.join(root, spec.name),
            evaluator_type="coco",
            dataset_root=root,
        )


def _check_coco_json(name: str, json_file: str, image_root: str) -> None:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset '{name}': annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Dataset '{name}': image folder not found: {image_root}")


def _load_checked(name: str, json_file: str, image_root: str):
    from .validate import validate_dataset_dicts

    _check_coco_json(name, json_file, image_root)
    try:
        dicts = load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    except KeyError as e:  # detectron2: "Encountered category_id=7 but this id does not exist ..."
        raise ValueError(
            _unknown_category_message(name, json_file) or f"Dataset '{name}' ({json_file}): {e}"
        ) from e
    validate_dataset_dicts(dicts, name, json_file)
    return dicts


def _unknown_category_message(name: str, json_file: str) -> str | None:
    """Which annotation (and image) has a category id missing from 'categories'."""
    with open(json_file) as f:
        coco = json.load(f)
    known = {c["id"] for c in coco.get("categories", [])}
    files = {im.get("id"): im.get("file_name") for im in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        if ann.get("category_id") not in known:
            return (
                f"Dataset '{name}' ({json_file}): annotation {ann.get('id')} of image "
                f"{files.get(ann.get('image_id'))} has category_id {ann.get('category_id')}, "
                f"which is not among the file's 'categories' (ids {sorted(known)})"
            )
    return None


def register_coco_json(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-json detection dataset under ``name`` (idempotent for the same files)."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    _check_coco_json(name, json_file, image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
            return
        raise ValueError(
            f"Dataset '{name}' is already registered with other files; choose another name"
        )
    try:
        with open(json_file) as f:
            cats = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
    except json.JSONDecodeError as e:
        raise ValueError(f"Dataset '{name}': {json_file} is not valid JSON ({e})") from e
    if not cats:
        raise ValueError(f"Dataset '{name}' ({json_file}): the file has no 'categories'")
    DatasetCatalog.register(name, functools.partial(_load_checked, name, json_file, image_root))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[c["name"] for c in cats],
    )


def register_from_config(cfg) -> None:
    """Register the embedded dataset (at DATASETS.EMBEDDED_ROOT) and every
    DATASETS.COCO_JSON entry (``[name, json_file, image_root]``, checked by
    ``eapm.validate_config``)."""
    register_embedded(cfg.DATASETS.EMBEDDED_ROOT or None)
    for name, json_file, image_root in cfg.DATASETS.COCO_JSON:
        register_coco_json(name, json_file, image_root)
