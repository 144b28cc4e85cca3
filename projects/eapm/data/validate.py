"""Checks of a COCO-json detection dataset, run before training starts, so that what
detectron2 would otherwise trip over deep inside training (a truncated JPEG, an image of
another size than its json says) or silently train on (duplicate image ids) fails at once
with a ``DatasetError`` naming the dataset, the json file and the image / annotation at fault.

Three stages, cheapest first (``check_coco_dataset``):

1. the json text (no image file touched): syntax (line and column), nesting, structure, an
   empty dataset, ids that are not integers or strings, duplicate image / annotation /
   category ids, category ids missing from ``categories``, a NUL byte in a file name, boxes
   with a negative size or a non-finite value, segmentations detectron2 cannot read
   (polygons that are not lists of finite numbers, an RLE of another size than its image);
   and it counts the annotations detectron2 will train on (not crowd, a non-empty box inside
   the image, a polygon of at least 3 points where polygons are given);
2. per image, in a thread pool (``eapm.data.image_check``): the file exists (one ``stat``),
   and by ``level``: ``"header"`` opens it and reads its header (format, size, EXIF
   orientation: a few KB), ``"decode"`` also decodes every pixel (the only way to find a
   truncated or corrupt file);
3. the result is cached per json file (``eapm.data.check_cache``): a second run only
   ``stat``s the images and re-opens the ones whose size or mtime changed.

Recoverable input is accepted: grayscale, palette, RGBA and 16-bit images (detectron2's
reader converts them to RGB), boxes partly (or wholly: a warning) outside the image, any
category ids (detectron2 maps them to contiguous ones), images without annotations,
annotations of images missing from ``images`` (a warning; detectron2 drops them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..losses.checks import is_number
from . import check_cache
from .image_check import LEVELS, ImageJob, ImageResult, run_image_checks

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "DatasetFileNotFoundError",
    "check_coco_dataset",
    "load_coco_json_text",
    "validate_coco",
]

# the 16/32-bit single-channel modes Pillow opens; detectron2's read_image converts them to
# 8-bit RGB by clipping at 255 (not by scaling), so they train, but mostly white
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_MAX_LISTED = 20  # bad images listed in the log, beyond the one named by the error


class DatasetError(ValueError):
    """A dataset that cannot be trained on as it is; the message names the dataset, its
    json file and the image or annotation at fault (one line)."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A file the dataset names (its json, image folder or an image) does not exist."""


# the traceback's last line reads ``eapm.data.DatasetError: ...``
DatasetError.__module__ = DatasetFileNotFoundError.__module__ = "eapm.data"


def _where(name: str, json_file: str) -> str:
    return f"Dataset '{name}' ({json_file})"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_coco_json_text(name: str, json_file: str) -> Dict:
    """The parsed json of ``json_file``. Raises ``DatasetError`` naming the file and the
    line and column of a syntax error (or the encoding error), ``DatasetFileNotFoundError``
    if it does not exist."""
    try:
        with open(json_file, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DatasetFileNotFoundError(
            f"Dataset '{name}': annotation file not found: {json_file}"
        ) from e
    except OSError as e:
        raise DatasetError(f"Dataset '{name}': cannot read {json_file} ({e})") from e
    try:
        return json.loads(raw)
    except RecursionError:
        raise DatasetError(
            f"Dataset '{name}': {json_file} is nested too deeply to be a COCO json"
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"Dataset '{name}': {json_file} is not valid JSON: line {e.lineno}, "
            f"column {e.colno}: {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"Dataset '{name}': {json_file} is not valid JSON: not UTF-8 text at byte "
            f"{e.start} ({e.reason})"
        ) from e


def categories_of(coco: Dict, name: str, json_file: str) -> List[Tuple[int, str]]:
    """``[(id, name), ...]`` sorted by id. Raises ``DatasetError`` for a missing or empty
    ``categories`` list, an entry without id or name, or a duplicate id."""
    cats = coco.get("categories") if isinstance(coco, dict) else None
    if not cats or not isinstance(cats, list):
        raise DatasetError(f"{_where(name, json_file)}: the file has no 'categories'")
    seen: Dict = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(
                f"{_where(name, json_file)}: categories[{i}] needs an 'id' and a 'name', "
                f"got {reprlib.repr(c)}"
            )
        if not _is_id(c["id"]):
            raise _id_error(_where(name, json_file), f"the id of categories[{i}]", c["id"])
        if c["id"] in seen:
            raise DatasetError(
                f"{_where(name, json_file)}: category id {c['id']!r} appears twice "
                f"('{seen[c['id']]}' and '{c['name']}')"
            )
        seen[c["id"]] = c["name"]
    return sorted(seen.items(), key=lambda kv: kv[0])


def _is_id(v) -> bool:
    """Whether ``v`` can be a COCO id: an integer or a string (detectron2 uses ids as keys)."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _id_error(where: str, what: str, v) -> DatasetError:
    return DatasetError(f"{where}: {what} must be an integer or a string, got {reprlib.repr(v)}")


def _number(v) -> Optional[float]:
    if not is_number(v):
        return None
    return float(v)


def _image_jobs(images: List, where: str, image_root: str) -> List[ImageJob]:
    jobs: List[ImageJob] = []
    by_id: Dict = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im:
            raise DatasetError(f"{where}: images[{i}] has no 'id'")
        iid = im["id"]
        if not _is_id(iid):
            raise _id_error(where, f"the id of images[{i}]", iid)
        fname = im.get("file_name")
        if not isinstance(fname, str) or not fname:
            raise DatasetError(f"{where}: image {iid} has no 'file_name'")
        if "\0" in fname:
            raise DatasetError(f"{where}: image {iid}: its 'file_name' holds a NUL byte")
        if iid in by_id:
            raise DatasetError(
                f"{where}: image id {iid} appears twice ('{by_id[iid].file_name}' and "
                f"'{fname}'); detectron2 would merge their annotations onto one file"
            )
        w, h = _number(im.get("width")), _number(im.get("height"))
        if w is None or h is None or not (w > 0 and h > 0) or not math.isfinite(w * h):
            raise DatasetError(
                f"{where}: image {iid} '{fname}' needs a positive 'width' and 'height', got "
                f"{im.get('width')!r} x {im.get('height')!r}"
            )
        by_id[iid] = ImageJob(len(jobs), iid, fname, os.path.join(image_root, fname), w, h)
        jobs.append(by_id[iid])
    return jobs


def _check_annotation(ann: Dict, job: ImageJob, known: set, where: str) -> str:
    """Raise for a bad annotation of ``job``'s image; else what detectron2 will do with it:
    ``"train"``, ``"crowd"`` (kept, not trained on), ``"outside"`` (its box lies wholly
    outside the image, or is empty: dropped) or ``"no_polygon"`` (none of its polygons has
    3 points: detectron2's ``load_coco_json`` drops the annotation)."""
    aid = ann["id"]
    if not _is_id(ann.get("category_id")) or ann["category_id"] not in known:
        raise DatasetError(
            f"{where}: annotation {aid} of image {job.file_name} has category_id "
            f"{ann.get('category_id')}, which is not among the file's 'categories' "
            f"(ids {sorted(known)})"
        )
    if ann.get("ignore", 0):
        raise DatasetError(
            f"{where}: annotation {aid} of {job.path} sets 'ignore', which detectron2 "
            "does not support (drop it or make it iscrowd)"
        )
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise DatasetError(f"{where}: annotation {aid} of {job.path} has no 4-value bbox")
    x, y, w, h = vals = [_number(v) for v in box]
    if any(v is None or not math.isfinite(v) for v in vals) or w < 0 or h < 0:
        raise DatasetError(
            f"{where}: annotation {aid} of {job.path} has an invalid box {list(box)} "
            "(XYWH with negative size or non-finite value)"
        )
    valid_polygons = _check_segmentation(
        ann.get("segmentation"), job, f"{where}: annotation {aid} of {job.path}"
    )
    if ann.get("iscrowd", 0):
        return "crowd"
    if not (x < job.width and y < job.height and x + w > 0 and y + h > 0 and w > 0 and h > 0):
        return "outside"
    return "train" if valid_polygons else "no_polygon"


def _check_segmentation(segm, job: ImageJob, where: str) -> bool:
    """Raise for a ``segmentation`` detectron2 cannot read (not a list of polygons of
    finite numbers, nor an RLE of the image's size); False if it is a list of polygons none
    of which has at least 3 points (6 numbers, an even count), which detectron2 drops."""
    if not segm:  # none, or empty: a box-only annotation
        return True
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if size != [int(job.height), int(job.width)]:
            raise DatasetError(
                f"{where}: its RLE segmentation has size {reprlib.repr(size)}, but the image "
                f"is [height, width] = [{job.height:g}, {job.width:g}]"
            )
        ok = isinstance(counts, str) or (
            isinstance(counts, list)
            and all(type(c) is int and c >= 0 for c in counts)
            and sum(counts) == size[0] * size[1]
        )
        if not ok:
            raise DatasetError(
                f"{where}: its RLE 'counts' must be a string or run lengths (integers >= 0) "
                "summing to height x width"
            )
        return True
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        raise DatasetError(
            f"{where}: its segmentation must be a list of polygons (lists of x, y numbers) "
            f"or an RLE object, got {reprlib.repr(segm)}"
        )
    valid = False
    for poly in segm:
        values = [_number(v) for v in poly]
        if any(v is None or not math.isfinite(v) for v in values):
            raise DatasetError(f"{where}: a polygon holds a value that is not a finite number")
        valid = valid or (len(poly) >= 6 and len(poly) % 2 == 0)
    return valid


def validate_coco(
    coco: Dict, name: str, json_file: str, image_root: str
) -> Tuple[List[ImageJob], Dict]:
    """The json-level checks (no image file is touched).

    Returns ``(jobs, summary)``: one ``ImageJob`` per image (json order) for the per-image
    checks, and ``{"images", "annotations", "trainable_annotations", "categories",
    "warnings"}`` (counts, ``[[id, name], ...]`` and the warning lines).

    Raises ``DatasetError`` naming the image id / annotation id / category id at fault:
    no images, an image without id / file_name / positive width and height, an id that is
    not an integer or a string, a NUL byte in a file name, a duplicate image, annotation or
    category id, an annotation whose category id is not among ``categories``, a bbox that is
    not 4 finite numbers with a width and height >= 0, a segmentation that is neither
    polygons of finite numbers nor an RLE of the image's size, ``ignore`` set (detectron2
    does not support it)."""
    where = _where(name, json_file)
    if not isinstance(coco, dict):
        raise DatasetError(
            f"{where}: the top level must be an object with 'images', 'annotations' and "
            f"'categories', got a {type(coco).__name__}"
        )
    images = coco.get("images")
    if not isinstance(images, list):
        raise DatasetError(f"{where}: the file has no 'images' list")
    if not images:
        raise DatasetError(f"{where}: the dataset is empty (its 'images' list is empty)")
    cats = categories_of(coco, name, json_file)
    jobs = _image_jobs(images, where, image_root)
    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{where}: 'annotations' must be a list")
    by_id = {j.image_id: j for j in jobs}
    known = {c for c, _ in cats}
    ann_ids = set()
    orphans: List = []
    fates: Dict[str, List] = {"train": [], "crowd": [], "outside": [], "no_polygon": []}
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or ann.get("id") is None:
            raise DatasetError(f"{where}: annotations[{k}] has no 'id'")
        aid = ann["id"]
        if not _is_id(aid):
            raise _id_error(where, f"the id of annotations[{k}]", aid)
        if not _is_id(ann.get("image_id")):
            raise _id_error(where, f"the image_id of annotation {aid}", ann.get("image_id"))
        if aid in ann_ids:
            raise DatasetError(f"{where}: annotation id {aid} appears twice")
        ann_ids.add(aid)
        job = by_id.get(ann.get("image_id"))
        if job is None:
            orphans.append(aid)
            continue
        fates[_check_annotation(ann, job, known, where)].append(aid)
    warnings: List[str] = []
    if orphans:
        warnings.append(
            f"{where}: {len(orphans)} annotations (e.g. id {orphans[0]}) belong to no image "
            "in 'images'; they are dropped"
        )
    outside, no_polygon = fates["outside"], fates["no_polygon"]
    if outside:
        warnings.append(
            f"{where}: {len(outside)} boxes (e.g. annotation {outside[0]}) are empty or lie "
            "wholly outside their image; they are clipped to empty boxes and dropped"
        )
    if no_polygon:
        warnings.append(
            f"{where}: {len(no_polygon)} annotations (e.g. id {no_polygon[0]}) have no polygon "
            "of at least 3 points (6 numbers, an even count); detectron2 drops them"
        )
    summary = {
        "images": len(jobs),
        "annotations": len(anns),
        "trainable_annotations": len(fates["train"]),
        "categories": [[c, n] for c, n in cats],
        "warnings": warnings,
    }
    return jobs, summary


# ---------------------------------------------------------------------------
# the whole check, with the per-image stage and the cache
# ---------------------------------------------------------------------------
# (json_file, image_root, level) -> (json signature, summary): what this process checked
_CHECKED: Dict[Tuple[str, str, int], Tuple[Tuple[int, int], Dict]] = {}


def checked_before(json_file: str, image_root: str, level: str) -> Optional[Dict]:
    """The summary of this process's earlier passed check of the unchanged json at
    ``level`` (or a higher one), else None."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    try:
        sig = check_cache.file_signature(json_file)
    except OSError:
        return None
    for lvl in range(_level(level), len(LEVELS)):
        memo = _CHECKED.get((json_file, image_root, lvl))
        if memo is not None and memo[0] == sig:
            return memo[1]
    return None


def _level(level) -> int:
    if level not in LEVELS:
        raise ValueError(f"check level must be one of {tuple(LEVELS)}, got {level!r}")
    return LEVELS[level]


def check_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    level: str = "decode",
    num_workers: int = 0,
    use_cache: bool = True,
) -> Dict:
    """Check the COCO-json dataset ``name`` (see the module docstring) and return its
    summary (``validate_coco``'s). Cached: in this process and in
    ``check_cache.cache_dir()`` (keyed by the json's path, size and mtime and each image's
    size and mtime), so a repeated call only ``stat``s the images.

    Args:
        level: ``"exists"`` (each image file exists), ``"header"`` (+ it opens as an image
            whose size, after EXIF orientation, is the json's width x height) or
            ``"decode"`` (+ every pixel decodes: finds truncated / corrupt files).
        num_workers: threads of the per-image checks; 0 = ``min(32, os.cpu_count())``.

    Raises ``DatasetFileNotFoundError`` (the json, the image folder or an image is
    missing), ``DatasetError`` (anything else at fault, named), ``ValueError`` for an
    unknown ``level``."""
    lvl = _level(level)
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    where = _where(name, json_file)
    if not os.path.isdir(image_root):
        raise DatasetFileNotFoundError(f"Dataset '{name}': image folder not found: {image_root}")
    try:
        sig = check_cache.file_signature(json_file)
    except FileNotFoundError as e:
        raise DatasetFileNotFoundError(
            f"Dataset '{name}': annotation file not found: {json_file}"
        ) from e
    memo = checked_before(json_file, image_root, level)
    if memo is not None:
        return memo

    t0 = time.perf_counter()
    entry = check_cache.load(json_file, image_root) if use_cache else None
    if entry is not None and tuple(entry["json"]) == sig:  # json unchanged: checks passed
        jobs, summary = check_cache.jobs_of(entry, image_root), entry["summary"]
    else:
        coco = load_coco_json_text(name, json_file)
        jobs, summary = validate_coco(coco, name, json_file, image_root)
        del coco
    known = check_cache.known_images(entry) if entry is not None else {}
    results = run_image_checks(jobs, lvl, known, num_workers, desc=f"Checking '{name}'")
    _raise_for_bad_images(name, json_file, jobs, results)
    if use_cache:
        path = check_cache.store(json_file, image_root, sig, summary, jobs, results)
    warnings = summary["warnings"] + _image_warnings(where, jobs, results)
    for w in warnings:
        logger.warning(w)
    opened = sum(1 for r in results if not r.cached)
    logger.info(
        f"{where}: {len(jobs)} images checked ({level}: {opened} opened, "
        f"{len(jobs) - opened} unchanged since the cached check) in "
        f"{time.perf_counter() - t0:.2f} s" + (f"; cache {path}" if use_cache and path else "")
    )
    summary = dict(summary, warnings=warnings)
    _CHECKED[(json_file, image_root, lvl)] = (sig, summary)
    return summary


def _image_warnings(where: str, jobs: Sequence[ImageJob], results: Sequence[ImageResult]):
    wide = [(j, r) for j, r in zip(jobs, results) if r.mode in WIDE_MODES]
    if not wide:
        return []
    j, r = wide[0]
    return [
        f"{where}: {len(wide)} images (e.g. {j.path}, mode {r.mode}) are 16/32-bit "
        "single-channel; detectron2's read_image converts them to 8 bits by clipping at 255, "
        "not by scaling"
    ]


def _raise_for_bad_images(
    name: str, json_file: str, jobs: Sequence[ImageJob], results: Sequence[ImageResult]
) -> None:
    where = _where(name, json_file)
    missing = [j for j, r in zip(jobs, results) if r.problem == "missing"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        for j in missing[1 : _MAX_LISTED + 1]:
            logger.error(f"{where}: image {j.image_id}: file not found: {j.path}")
        raise DatasetFileNotFoundError(f"{where}: image file not found: {missing[0].path}{more}")
    bad = [(j, r) for j, r in zip(jobs, results) if r.problem is not None]
    if not bad:
        return
    messages = [f"image {j.image_id} '{j.path}' {_describe(j, r)}" for j, r in bad]
    for m in messages[1 : _MAX_LISTED + 1]:
        logger.error(f"{where}: {m}")
    more = f" (and {len(bad) - 1} more bad images, listed in the log)" if len(bad) > 1 else ""
    raise DatasetError(f"{where}: {messages[0]}{more}")


def _describe(job: ImageJob, r: ImageResult) -> str:
    if r.problem == "size":
        return (
            f"is {r.detail} pixels (width x height, after EXIF orientation) but the json says "
            f"{job.width:g}x{job.height:g}"
        )
    what = {
        "corrupt": "is corrupt or truncated",
        "not_image": "is not an image file Pillow can read",
        "unreadable": "cannot be read",
    }[r.problem]
    return f"{what} ({_one_line(r.detail)})"
