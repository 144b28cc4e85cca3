"""tools/visualize.py: an untrained model's detections drawn on a registered dataset (with the
ground truth alongside), a folder and a single image; a LazyConfig config; the errors."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO, load_tool, tiny_cfg


def test_visualize_untrained_model_writes_pngs(tiny_coco, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    js, imgs = tiny_coco
    opts = ["MODEL.RETINANET.NUM_CONVS", "1", "MODEL.FPN.OUT_CHANNELS", "32",
            "TEST.DETECTIONS_PER_IMAGE", "5",
            "DATASETS.EMBEDDED_ROOT", str(tmp_path / "shapes"),
            "DATASETS.COCO_JSON", f"[['tiny_vis', '{js}', '{imgs}']]"]  # fmt: skip
    model = build_model(tiny_cfg("quickstart/retinanet.yaml", *opts[:6]))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("untrained")
    weights = str(tmp_path / "untrained.pth")
    tool = load_tool("visualize")
    common = [
        "--config-file",
        os.path.join(REPO, "configs/quickstart/retinanet.yaml"),
        "--weights",
        weights,
    ]
    # a registered dataset, with the ground truth alongside; score 0 so boxes get drawn
    files = tool.main(common + ["--input", "tiny_vis", "--num", "2", "--show-gt",
                                "--score-thresh", "0",
                                "--output", str(tmp_path / "ds"), "--opts", *opts])  # fmt: skip
    assert [os.path.basename(f) for f in files] == ["img0.png", "img1.png"]
    from PIL import Image

    w, h = Image.open(files[0]).size
    assert h == 512 and w == 2 * 512 + 8  # 64 px drawn at 8x, prediction | ground truth
    # a folder and a single image
    files = tool.main(
        common + ["--input", imgs, "--output", str(tmp_path / "dir"), "--opts", *opts]
    )
    assert len(files) == 4 and all(os.path.getsize(f) > 0 for f in files)
    one = tool.main(
        common
        + [
            "--input",
            os.path.join(imgs, "img3.png"),
            "--output",
            str(tmp_path / "one"),
            "--opts",
            *opts,
        ]
    )
    assert len(one) == 1 and os.path.isfile(one[0])
    with pytest.raises(SystemExit, match="neither an image"):
        tool.main(
            common
            + ["--input", "no_such_dataset", "--output", str(tmp_path / "x"), "--opts", *opts]
        )
    with pytest.raises(SystemExit, match=r"^visualize.py: error: weights file not found: "):
        tool.main(
            common[:3]
            + [str(tmp_path / "none.pth"), "--input", imgs, "--output", str(tmp_path / "x")]
            + ["--opts", *opts]
        )


def test_visualize_lazy_config(tiny_coco, tmp_path):
    """A LazyConfig (once a raw yaml.parser.ParserError): its model, its weights, its
    overrides."""
    from eapm.checkpoint import EAPMCheckpointer
    from eapm.model_zoo import build_model, get_config

    js, imgs = tiny_coco
    config = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.py")
    model = build_model(get_config(config, ["model.max_detections_per_image=3"]), "cpu")
    EAPMCheckpointer(model, save_dir=str(tmp_path)).save("untrained")
    tool = load_tool("visualize")
    files = tool.main(
        ["--config-file", config, "--weights", str(tmp_path / "untrained.pth"),
         "--input", imgs, "--num", "2", "--score-thresh", "0", "--scale", "1",
         "--output", str(tmp_path / "out"), "--opts", "model.max_detections_per_image=3"]
    )  # fmt: skip
    assert [os.path.basename(f) for f in files] == ["img0.png", "img1.png"]
    from PIL import Image

    assert Image.open(files[0]).size == (64, 64)
