"""Dataset registration: the embedded eapm_shapes splits and any COCO-json dataset.

COCO 2017 (``coco_2017_train`` / ``coco_2017_val`` / ``coco_2017_test-dev``) comes
from detectron2's builtin registration under ``$DETECTRON2_DATASETS/coco``.
"""

from __future__ import annotations

import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..losses.checks import is_number
from . import shapes
from .image_check import LEVELS
from .validate import (
    DatasetError,
    DatasetFileNotFoundError,
    categories_of,
    check_coco_dataset,
    checked_before,
    load_coco_json_text,
)

__all__ = [
    "register_embedded",
    "register_coco_json",
    "register_from_config",
    "require_trainable",
    "check_category_counts",
    "check_data_config",
    "EMBEDDED_NAMES",
]

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
        raise DatasetFileNotFoundError(f"Dataset '{name}': annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise DatasetFileNotFoundError(f"Dataset '{name}': image folder not found: {image_root}")


def _load_checked(name: str, json_file: str, image_root: str, level: str, num_workers: int):
    """The dataset's dicts, after ``check_coco_dataset`` (instant when this process or the
    cache has checked the unchanged files)."""
    check_coco_dataset(name, json_file, image_root, level=level, num_workers=num_workers)
    return load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])


def register_coco_json(
    name: str,
    json_file: str,
    image_root: str,
    *,
    check_images: str = "decode",
    check_workers: int = 0,
    check_now: bool = False,
) -> None:
    """Register a COCO-json detection dataset under ``name`` (idempotent for the same files).

    The dataset is checked (``eapm.data.validate.check_coco_dataset`` at level
    ``check_images``: "exists", "header" or "decode", in ``check_workers`` threads, 0 = one
    per CPU) when it is first loaded, or here with ``check_now`` (what a training run wants:
    the error before the model is built; in a multi-process run the first process of each
    machine checks, the others then find the result cached).

    Raises ``DatasetFileNotFoundError`` (the json or image folder is missing),
    ``DatasetError`` (invalid json, no categories; with ``check_now`` whatever the check
    finds), ``ValueError`` if ``name`` is registered with other files or for an unknown
    ``check_images``."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if check_images not in LEVELS:
        raise ValueError(f"check_images must be one of {tuple(LEVELS)}, got {check_images!r}")
    _check_coco_json(name, json_file, image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file", None) != json_file or meta.get("image_root", None) != image_root:
            raise ValueError(
                f"Dataset '{name}' is already registered with other files; choose another name"
            )
    else:
        if check_now:
            cats = _check_on_each_machine(name, json_file, image_root, check_images, check_workers)
        else:
            cats = _categories(name, json_file, image_root)
        loader = functools.partial(
            _load_checked, name, json_file, image_root, check_images, check_workers
        )
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=[n for _, n in cats],
        )
        return
    if check_now:
        _check_on_each_machine(name, json_file, image_root, check_images, check_workers)


def _categories(name: str, json_file: str, image_root: str):
    """[[id, name], ...] of the json (from the check cache while the json is unchanged)."""
    from . import check_cache

    entry = check_cache.load(json_file, image_root)
    if entry is not None and tuple(entry["json"]) == check_cache.file_signature(json_file):
        return entry["summary"]["categories"]
    return categories_of(load_coco_json_text(name, json_file), name, json_file)


def _check_on_each_machine(name, json_file, image_root, level, num_workers):
    """``check_coco_dataset`` in the first process of each machine, then (after a barrier,
    from the cache) in the others; returns the categories."""
    from detectron2.utils import comm

    done = checked_before(json_file, image_root, level)
    if done is not None:  # so in every process (they all make the same calls): no barrier
        return done["categories"]
    if comm.get_world_size() == 1:
        return check_coco_dataset(
            name, json_file, image_root, level=level, num_workers=num_workers
        )["categories"]
    try:
        first = comm.get_local_rank() == 0
    except AssertionError:  # a process group without detectron2's local groups
        first = comm.get_rank() == 0
    if first:
        check_coco_dataset(name, json_file, image_root, level=level, num_workers=num_workers)
    comm.synchronize()
    return check_coco_dataset(name, json_file, image_root, level=level, num_workers=num_workers)[
        "categories"
    ]


def register_from_config(cfg) -> None:
    """Register the embedded dataset (at DATASETS.EMBEDDED_ROOT) and every
    DATASETS.COCO_JSON entry (``[name, json_file, image_root]``, checked by
    ``eapm.validate_config``). The COCO-json datasets this run uses (named in
    DATASETS.TRAIN or DATASETS.TEST) are checked now (``register_coco_json``'s
    ``check_now``, at level DATASETS.CHECK_IMAGES in DATASETS.CHECK_WORKERS threads), so a
    bad one fails before the model is built; so does a training set none of whose
    annotations detectron2 would train on, while DATALOADER.FILTER_EMPTY_ANNOTATIONS is on
    (it would drop every image).

    Raises ``DatasetError`` / ``DatasetFileNotFoundError`` naming the dataset, file and id."""
    register_embedded(cfg.DATASETS.EMBEDDED_ROOT or None)
    level = cfg.DATASETS.CHECK_IMAGES
    workers = cfg.DATASETS.CHECK_WORKERS
    used = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    for name, json_file, image_root in cfg.DATASETS.COCO_JSON:
        register_coco_json(
            name,
            json_file,
            image_root,
            check_images=level,
            check_workers=workers,
            check_now=name in used,
        )
    if not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:  # all-background training is allowed
        return
    for name, json_file, image_root in cfg.DATASETS.COCO_JSON:
        if name in cfg.DATASETS.TRAIN:
            require_trainable(name, json_file, image_root, level, workers)


def require_trainable(
    name: str, json_file: str, image_root: str, level: str = "header", num_workers: int = 0
) -> None:
    """Raise ``DatasetError`` if the COCO-json training set ``name`` has no annotation
    detectron2 would train on (none that is not iscrowd, has a non-empty box inside its
    image and, where polygons are given, a polygon of at least 3 points): the run would
    train on nothing. (Checks the dataset first, from the cache when unchanged.)"""
    summary = check_coco_dataset(name, json_file, image_root, level=level, num_workers=num_workers)
    if summary["trainable_annotations"] == 0:
        raise DatasetError(
            f"Dataset '{name}' ({os.path.abspath(json_file)}): none of its "
            f"{summary['annotations']} annotations survives detectron2's filters (not "
            "iscrowd, a non-empty box inside its image, a polygon of at least 3 points "
            "where polygons are given), so there is nothing to train on"
        )


def check_category_counts(names, classes) -> None:
    """Compare the number of categories (``thing_classes``) of each registered dataset of
    ``names`` with the model's class counts ``classes`` (``{key: count}``, the keys the
    model reads, e.g. ``{"MODEL.RETINANET.NUM_CLASSES": 4}``).

    Raises ``DatasetError`` naming the dataset, both numbers and the key when a dataset has
    more categories than classes (its last categories would train as background, then crash
    the loss); logs a warning naming the same when it has fewer. Datasets without
    ``thing_classes`` are skipped."""
    import logging

    for name in dict.fromkeys(names):
        if name not in DatasetCatalog.list():
            continue
        cats = MetadataCatalog.get(name).get("thing_classes", None)
        if cats is None:
            continue
        n = len(cats)
        for key, k in classes.items():
            if n > k:
                raise DatasetError(
                    f"Dataset '{name}' has {n} categories, but the model has {k} classes "
                    f"({key} = {k}); set {key} to {n}"
                )
            if n < k:
                logging.getLogger(__name__).warning(
                    f"Dataset '{name}' has {n} categories, fewer than the model's {k} classes "
                    f"({key} = {k}); the other classes never see an example"
                )


def check_data_config(cfg) -> None:
    """The rules of the dataset and loader keys this package uses (DATASETS.CHECK_IMAGES,
    CHECK_WORKERS, COCO_JSON; DATALOADER.EXACT_RESUME with SAMPLER_TRAIN), applied when the
    config is loaded: ``ValueError`` naming the key."""
    from ..config import invalid

    d = cfg.DATASETS
    if d.CHECK_IMAGES not in LEVELS:
        raise invalid("DATASETS.CHECK_IMAGES", d.CHECK_IMAGES, f"must be one of {tuple(LEVELS)}")
    w = d.CHECK_WORKERS
    if not (is_number(w, integer=True) and w >= 0):
        raise invalid("DATASETS.CHECK_WORKERS", w, "must be an integer >= 0")
    for i, entry in enumerate(d.COCO_JSON):
        ok = isinstance(entry, (list, tuple)) and len(entry) == 3
        if not (ok and all(isinstance(x, str) for x in entry)):
            raise invalid(
                f"DATASETS.COCO_JSON[{i}]",
                entry,
                "each entry must be [name, json_file, image_root]",
            )
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if cfg.DATALOADER.EXACT_RESUME and sampler != "TrainingSampler":
        raise invalid(
            "DATALOADER.SAMPLER_TRAIN",
            sampler,
            "DATALOADER.EXACT_RESUME True implements 'TrainingSampler' only (set EXACT_RESUME "
            "False for detectron2's other samplers)",
        )
