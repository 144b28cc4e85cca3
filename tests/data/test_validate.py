"""eapm/data/validate.py, the dataset checks (``check_coco_dataset``), in process: each bad case
gets a DatasetError naming the dataset, the json file and the id / file at fault; the
recoverable cases pass; the per-image checks at each level (its image_check.py) and the result
cached per json file outside the repository (its check_cache.py).

(In test_register.py, through the lazy DatasetCatalog path: a missing image, negative / NaN box
sizes, an unknown category id, no categories, a truncated json, category ids from 0. Not
repeated here.)"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

from eapm.data import DatasetError, DatasetFileNotFoundError, check_cache, check_coco_dataset
from eapm.data import image_check as image_check_module
from eapm.data import validate as validate_module
from tests.helpers import REPO, dataset_cfg, dataset_in, dump, truncate_file


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder (never the user's, never the repository) and no memo of
    earlier checks in this process."""
    monkeypatch.setenv("EAPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(validate_module, "_CHECKED", {})
    return tmp_path / "cache"


@pytest.fixture
def opened(monkeypatch):
    """The paths Pillow opened (the per-image check at level header / decode)."""
    paths = []
    original = image_check_module.inspect_image

    def counting(path, decode):
        paths.append(path)
        return original(path, decode)

    monkeypatch.setattr(image_check_module, "inspect_image", counting)
    return paths


def _check(tmp_path, coco, level="decode", workers=1, name="d"):
    js = dump(coco, str(tmp_path / "ann.json"))
    return check_coco_dataset(name, js, str(tmp_path / "imgs"), level=level, num_workers=workers)


def _where(tmp_path, name="d"):
    return re.escape(f"Dataset '{name}' ({tmp_path / 'ann.json'}): ")


# ---------------------------------------------------------------------------
# json-level checks (no image opened)
# ---------------------------------------------------------------------------
def test_json_syntax_error_names_file_line_and_column(tmp_path):
    js = tmp_path / "ann.json"
    js.write_text('{\n  "images": [],\n  "categories": [{"id": 1 "name": "a"}]\n}\n')
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DatasetError) as e:
        check_coco_dataset("d", str(js), str(tmp_path / "imgs"))
    assert str(e.value) == (
        f"Dataset 'd': {js} is not valid JSON: line 3, column 27: Expecting ',' delimiter"
    )


def test_json_not_utf8(tmp_path):
    js = tmp_path / "ann.json"
    js.write_bytes(b'{"images": ["\xff"]}')
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DatasetError, match=r"ann\.json is not valid JSON: not UTF-8 text at byte"):
        check_coco_dataset("d", str(js), str(tmp_path / "imgs"))


def test_empty_dataset_names_it(tmp_path):
    coco, _ = dataset_in(tmp_path)
    coco["images"], coco["annotations"] = [], []
    with pytest.raises(DatasetError, match=_where(tmp_path) + r"the dataset is empty"):
        _check(tmp_path, coco)


def test_duplicate_image_id(tmp_path):
    coco, _ = dataset_in(tmp_path)
    coco["images"][2]["id"] = coco["images"][0]["id"]
    with pytest.raises(
        DatasetError,
        match=_where(tmp_path) + r"image id 1 appears twice \('000\.png' and '002\.png'\)",
    ):
        _check(tmp_path, coco)


def test_duplicate_annotation_and_category_ids(tmp_path):
    coco, _ = dataset_in(tmp_path)
    coco["annotations"][2]["id"] = coco["annotations"][0]["id"]
    with pytest.raises(DatasetError, match=_where(tmp_path) + "annotation id 1 appears twice"):
        _check(tmp_path, coco)
    coco, _ = dataset_in(tmp_path)
    coco["categories"].append({"id": 2, "name": "again"})
    with pytest.raises(DatasetError, match=r"category id 2 appears twice \('class2' and 'again'\)"):
        _check(tmp_path, coco)


@pytest.mark.parametrize(
    "bbox", [[1.0, 2.0, float("inf"), 4.0], [float("-inf"), 2.0, 3.0, 4.0], [1, 2, "3", 4]]
)
def test_infinite_or_non_numeric_box_names_annotation(tmp_path, bbox):
    coco, _ = dataset_in(tmp_path)
    coco["annotations"][2]["bbox"] = bbox
    with pytest.raises(
        DatasetError, match=_where(tmp_path) + r"annotation 3 of .*imgs/001\.png has an invalid box"
    ):
        _check(tmp_path, coco)


def test_unknown_category_is_a_dataset_error(tmp_path):
    coco, _ = dataset_in(tmp_path)
    coco["annotations"][0]["category_id"] = 9
    with pytest.raises(DatasetError, match=_where(tmp_path) + "annotation 1 .* category_id 9"):
        _check(tmp_path, coco)


@pytest.mark.parametrize("key,value", [("width", 0), ("height", None), ("width", "64")])
def test_image_without_positive_size(tmp_path, key, value):
    coco, _ = dataset_in(tmp_path)
    coco["images"][1][key] = value
    with pytest.raises(DatasetError, match=r"image 2 '001\.png' needs a positive 'width'"):
        _check(tmp_path, coco)


def test_ignore_flag_rejected(tmp_path):
    coco, _ = dataset_in(tmp_path)
    coco["annotations"][1]["ignore"] = 1
    with pytest.raises(DatasetError, match="annotation 2 of .* sets 'ignore'"):
        _check(tmp_path, coco)


# ---------------------------------------------------------------------------
# per-image checks: which level finds what
# ---------------------------------------------------------------------------
def _jpeg(tmp_path, coco, index):
    """Re-encode image ``index`` of ``coco`` as a JPEG (the json renamed to match)."""
    import cv2

    im = coco["images"][index]
    src = tmp_path / "imgs" / im["file_name"]
    im["file_name"] = im["file_name"].replace(".png", ".jpg")
    dst = tmp_path / "imgs" / im["file_name"]
    cv2.imwrite(str(dst), cv2.imread(str(src)))
    return str(dst)


def test_truncated_png_found_by_decoding_only(tmp_path, opened):
    coco, imgs = dataset_in(tmp_path)
    truncate_file(os.path.join(imgs, "001.png"))
    assert _check(tmp_path, coco, level="header")["images"] == 3  # the header is intact
    assert len(opened) == 3
    with pytest.raises(DatasetError) as e:
        _check(tmp_path, coco, level="decode")
    path = os.path.join(imgs, "001.png")
    assert re.fullmatch(
        _where(tmp_path) + rf"image 2 '{re.escape(path)}' is corrupt or truncated \(.+\)",
        str(e.value),
    ), str(e.value)


def test_truncated_jpeg(tmp_path):
    coco, _ = dataset_in(tmp_path)
    path = _jpeg(tmp_path, coco, 2)
    truncate_file(path, 0.6)
    with pytest.raises(DatasetError, match=rf"image 3 '{re.escape(path)}' is corrupt or truncated"):
        _check(tmp_path, coco)


def test_not_an_image_found_from_the_header(tmp_path):
    coco, imgs = dataset_in(tmp_path)
    with open(os.path.join(imgs, "000.png"), "wb") as f:
        f.write(b"this is no image" * 10)
    with pytest.raises(DatasetError, match=r"image 1 '.*000\.png' is not an image file Pillow"):
        _check(tmp_path, coco, level="header")


def test_missing_image_is_file_not_found_with_count(tmp_path):
    coco, imgs = dataset_in(tmp_path)
    os.remove(os.path.join(imgs, "000.png"))
    os.remove(os.path.join(imgs, "002.png"))
    with pytest.raises(DatasetFileNotFoundError) as e:
        _check(tmp_path, coco, level="exists")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DatasetError)
    assert str(e.value).endswith(f"image file not found: {imgs}/000.png (and 1 more)")


def test_size_differs_from_json_found_from_the_header(tmp_path, opened):
    coco, _ = dataset_in(tmp_path)
    coco["images"][1]["height"] = 48
    with pytest.raises(
        DatasetError,
        match=r"image 2 '.*001\.png' is 64x64 pixels \(width x height, after EXIF "
        r"orientation\) but the json says 64x48$",
    ):
        _check(tmp_path, coco, level="header")


def test_exif_orientation_counts_as_detectron2_reads_it(tmp_path):
    """A JPEG stored 48 wide x 64 high with EXIF orientation 6 (rotate 90): detectron2's
    reader returns it 64 wide x 48 high, so that is what the json must say."""
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    coco, imgs = dataset_in(tmp_path, num_images=1, boxes_per_image=(0,))
    im = coco["images"][0]
    im["file_name"], im["width"], im["height"] = "rot.jpg", 64, 48
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (48, 64), (200, 10, 10)).save(os.path.join(imgs, "rot.jpg"), exif=exif)
    assert read_image(os.path.join(imgs, "rot.jpg"), format="BGR").shape == (48, 64, 3)
    for level in ("header", "decode"):
        assert _check(tmp_path, coco, level=level)["images"] == 1
    im["width"], im["height"] = 48, 64  # the stored size, not what training sees
    validate_module._CHECKED.clear()
    with pytest.raises(DatasetError, match="is 64x48 pixels"):
        _check(tmp_path, coco, level="header")


def test_first_bad_image_in_json_order_is_named_with_the_count(tmp_path, caplog):
    coco, imgs = dataset_in(tmp_path, num_images=12)
    for i in (3, 7, 10):
        truncate_file(os.path.join(imgs, f"{i:03d}.png"))
    with caplog.at_level(logging.ERROR, logger="eapm.data.validate"):
        with pytest.raises(DatasetError) as e:
            _check(tmp_path, coco, workers=4)
    assert re.search(
        r"image 4 '.*003\.png' is corrupt or truncated \(.*\) \(and 2 more bad images, "
        r"listed in the log\)$",
        str(e.value),
    ), str(e.value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "007.png" in logged and "010.png" in logged


def test_unknown_level(tmp_path):
    coco, _ = dataset_in(tmp_path)
    with pytest.raises(ValueError, match="check level must be one of"):
        _check(tmp_path, coco, level="full")


# ---------------------------------------------------------------------------
# recoverable input passes
# ---------------------------------------------------------------------------
def test_recoverable_images_and_boxes_pass(tmp_path, caplog):
    """Grayscale, RGBA and 16-bit PNGs, boxes partly (and one wholly) outside the image and
    category ids from 0: the check passes, with warnings for the 16-bit image and the
    box outside."""
    import cv2

    coco, imgs = dataset_in(tmp_path, num_images=4, cat_ids=(0, 5))
    rng = np.random.default_rng(0)
    cv2.imwrite(os.path.join(imgs, "000.png"), rng.integers(0, 255, (64, 64), np.uint8))
    rgba = rng.integers(0, 255, (64, 64, 4), np.uint8)
    cv2.imwrite(os.path.join(imgs, "001.png"), rgba)
    cv2.imwrite(os.path.join(imgs, "002.png"), rng.integers(0, 65535, (64, 64), np.uint16))
    coco["annotations"][0]["bbox"] = [-10.0, -5.0, 30.0, 20.0]  # partly outside
    coco["annotations"][1]["bbox"] = [50.0, 40.0, 30.0, 40.0]  # partly outside
    coco["annotations"][2]["bbox"] = [70.0, 10.0, 5.0, 5.0]  # wholly outside
    with caplog.at_level(logging.WARNING, logger="eapm.data.validate"):
        summary = _check(tmp_path, coco, level="decode")
    assert summary["images"] == 4 and summary["categories"] == [[0, "class0"], [5, "class5"]]
    warnings = "\n".join(summary["warnings"])
    assert "1 boxes (e.g. annotation 3) are empty or lie wholly outside" in warnings
    assert re.search(r"1 images \(e\.g\. .*002\.png, mode I;16\) are 16/32-bit", warnings)
    assert warnings in "\n".join(r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------
def test_second_check_opens_no_image_and_changes_are_rechecked(tmp_path, cache, opened):
    coco, imgs = dataset_in(tmp_path, num_images=5)
    _check(tmp_path, coco)
    assert len(opened) == 5
    files = os.listdir(cache / "dataset_checks")
    assert len(files) == 1 and files[0].startswith("ann.json.")
    assert not any(p.startswith(str(cache)) for p in opened) and not str(cache).startswith(REPO)

    validate_module._CHECKED.clear()  # a new process: only the on-disk cache is left
    opened.clear()
    _check(tmp_path, coco)
    assert opened == []

    # an image that changed after the check is opened again (and found truncated)
    validate_module._CHECKED.clear()
    truncate_file(os.path.join(imgs, "003.png"))
    with pytest.raises(DatasetError, match=r"image 4 '.*003\.png' is corrupt"):
        check_coco_dataset("d", str(tmp_path / "ann.json"), imgs)
    assert opened == [os.path.join(imgs, "003.png")]


def test_changed_json_is_checked_again_unchanged_images_are_not(tmp_path, opened):
    coco, imgs = dataset_in(tmp_path, num_images=4)
    _check(tmp_path, coco)
    opened.clear()
    validate_module._CHECKED.clear()
    coco["annotations"][0]["bbox"] = [1.0, 1.0, -2.0, 3.0]
    with pytest.raises(DatasetError, match="annotation 1 .* has an invalid box"):
        _check(tmp_path, coco)
    coco["annotations"][0]["bbox"] = [1.0, 1.0, 2.0, 3.0]
    coco["images"][2]["height"] = 60  # the json's size changes: that image is opened again
    with pytest.raises(DatasetError, match=r"image 3 '.*002\.png' is 64x64 pixels"):
        _check(tmp_path, coco)
    assert opened == [os.path.join(imgs, "002.png")]


def test_header_level_after_decode_level_uses_the_cache(tmp_path, opened):
    coco, _ = dataset_in(tmp_path)
    _check(tmp_path, coco, level="decode")
    opened.clear()
    validate_module._CHECKED.clear()
    _check(tmp_path, coco, level="header")
    assert opened == []
    validate_module._CHECKED.clear()
    _check(tmp_path, coco, level="decode")  # the header check kept the decode level
    assert opened == []


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("EAPM_CACHE", str(tmp_path / "a"))
    assert check_cache.cache_dir() == str(tmp_path / "a" / "dataset_checks")
    monkeypatch.delenv("EAPM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert check_cache.cache_dir() == str(tmp_path / "xdg" / "eapm" / "dataset_checks")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert check_cache.cache_dir() == str(tmp_path / "home" / ".cache" / "eapm" / "dataset_checks")


def test_unwritable_or_broken_cache_is_not_fatal(tmp_path, cache, opened, caplog):
    coco, _ = dataset_in(tmp_path)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="eapm.data.check_cache"):
        assert _check(tmp_path, coco)["images"] == 3
    assert "Could not write the dataset-check cache" in caplog.text
    cache.unlink()
    _check(tmp_path, coco)  # memo: not written
    validate_module._CHECKED.clear()
    _check(tmp_path, coco)
    entry = check_cache.entry_path(str(tmp_path / "ann.json"), str(tmp_path / "imgs"))
    with open(entry, "w") as f:
        f.write('{"version": 1, "images": [')
    validate_module._CHECKED.clear()
    opened.clear()
    assert _check(tmp_path, coco)["images"] == 3
    assert len(opened) == 3
    with open(entry) as f:
        assert json.load(f)["version"] == check_cache.VERSION  # rewritten


def _polygons_only(tmp_path, polygon):
    coco, imgs = dataset_in(tmp_path)
    for ann in coco["annotations"]:
        ann["segmentation"] = [list(polygon)]
    return coco, imgs


def test_a_training_set_whose_polygons_detectron2_drops_is_rejected(tmp_path):
    from eapm.data import register_from_config

    coco, imgs = _polygons_only(tmp_path, [1.0, 1.0, 9.0, 1.0, 9.0])  # odd: detectron2 drops it
    n = len(coco["annotations"])
    summary = _check(tmp_path, coco)
    assert summary["trainable_annotations"] == 0
    assert f"{n} annotations (e.g. id 1) have no polygon of at least 3 points" in "\n".join(
        summary["warnings"]
    )
    name = f"oddpoly_{abs(hash(str(tmp_path))) % 10**8}"
    cfg = dataset_cfg(
        [[name, str(tmp_path / "ann.json"), imgs]], train=[name], embedded=str(tmp_path)
    )
    with pytest.raises(DatasetError, match=rf"'{name}' .*none of its {n} annotations survives"):
        register_from_config(cfg)


def test_valid_polygons_and_rle_are_trainable(tmp_path):
    coco, _ = _polygons_only(tmp_path, [1.0, 1.0, 9.0, 1.0, 9.0, 9.0])
    coco["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": [64 * 60, 64 * 4]}
    coco["annotations"][1]["segmentation"] = {"size": [64, 64], "counts": "PPYo0"}
    assert _check(tmp_path, coco)["trainable_annotations"] == len(coco["annotations"])


@pytest.mark.parametrize(
    "segmentation, match",
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "must be a list of polygons"),  # flat list
        ([["1", "2", "3", "4", "5", "6"]], "not a finite number"),
        ([[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]], "not a finite number"),
        ({"size": [32, 64], "counts": "abc"}, r"RLE segmentation has size \[32, 64\]"),
        ({"size": [64, 64], "counts": [1, 2]}, "run lengths"),
        ({"size": [64, 64], "counts": 7}, "run lengths"),
        ("polygon", "must be a list of polygons"),
    ],
)
def test_a_segmentation_detectron2_cannot_read_names_the_annotation(tmp_path, segmentation, match):
    coco, _ = dataset_in(tmp_path)
    coco["annotations"][1]["segmentation"] = segmentation
    with pytest.raises(DatasetError, match=_where(tmp_path) + r"annotation 2 of .*" + match):
        _check(tmp_path, coco)


@pytest.mark.parametrize(
    "where, value, match",
    [
        ("image", [1], r"the id of images\[0\] must be an integer or a string, got \[1\]"),
        ("image", {"a": 1}, r"the id of images\[0\] must be an integer or a string"),
        ("annotation", [3], r"the id of annotations\[0\] must be an integer or a string"),
        ("image_id", {"x": 0}, r"the image_id of annotation 1 must be an integer or a string"),
        ("category", [1], r"the id of categories\[0\] must be an integer or a string"),
        ("category_id", [1], r"annotation 1 of .* has category_id \[1\]"),
        ("file_name", "a\0.png", r"image 1: its 'file_name' holds a NUL byte"),
    ],
)
def test_ids_of_other_types_and_nul_bytes_name_the_entry(tmp_path, where, value, match):
    coco, _ = dataset_in(tmp_path)
    target = {"image": ("images", "id"), "annotation": ("annotations", "id"),
              "image_id": ("annotations", "image_id"), "category": ("categories", "id"),
              "category_id": ("annotations", "category_id"),
              "file_name": ("images", "file_name")}[where]  # fmt: skip
    coco[target[0]][0][target[1]] = value
    with pytest.raises(DatasetError, match=_where(tmp_path) + match):
        _check(tmp_path, coco)


def test_a_json_nested_too_deep_names_the_file(tmp_path):
    js = tmp_path / "ann.json"
    js.write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DatasetError, match=re.escape(f"Dataset 'd': {js} is nested too deeply")):
        check_coco_dataset("d", str(js), str(tmp_path / "imgs"))
