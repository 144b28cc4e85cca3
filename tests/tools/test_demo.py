"""demo/demo.py and what it stands on (``eapm.predictor``): a quickstart RetinaNet with the
weights of its random initialisation, saved by ``EAPMCheckpointer``, draws its detections on
two generated images, for the yacs config and its LazyConfig twin; the errors name what is
missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, env

DEMO = os.path.join(REPO, "demo", "demo.py")
YAML = "quickstart/eapm_retinanet.yaml"  # by its eapm.model_zoo name
LAZY = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.py")  # by its path
LINE = re.compile(r"^(?P<path>.+): (?P<n>\d+) detections? in (?P<s>\d+\.\d\d) s$")


def _load_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eapm_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo():
    return _load_demo()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 128x128 RGB PNGs: filled shapes on noise, as the embedded dataset's images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        img = rng.integers(0, 80, size=(128, 128, 3)).astype(np.uint8)
        img[20 + 10 * i : 60, 30:100] = (230, 120, 40)
        img[80:120, 10 + 20 * i : 40 + 20 * i] = (40, 200, 240)
        path = root / f"img{i}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def _save_initial_weights(config: str, path: str) -> str:
    from eapm.checkpoint import EAPMCheckpointer
    from eapm.model_zoo import build_model, get_config

    model = build_model(get_config(config), "cpu")
    folder, name = os.path.split(path)
    EAPMCheckpointer(model, save_dir=folder).save(name)
    return path + ".pth"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {
        "yaml": _save_initial_weights(YAML, str(root / "yaml_init")),
        "lazy": _save_initial_weights(LAZY, str(root / "lazy_init")),
    }


def _undrawn(path: str) -> np.ndarray:
    """The image as detectron2's Visualizer renders it with nothing drawn (its rendering
    resamples: not the file's pixels)."""
    from detectron2.utils.visualizer import Visualizer

    return Visualizer(np.asarray(Image.open(path).convert("RGB")), None).output.get_image()


def _weights_opts(kind: str, path: str):
    return ["MODEL.WEIGHTS", path] if kind == "yaml" else [f"train.init_checkpoint={path}"]


@pytest.mark.parametrize("kind", ["yaml", "lazy"])
def test_demo_draws_the_detections(demo, images, weights, tmp_path, capsys, kind):
    from detectron2.data.detection_utils import read_image

    from eapm.model_zoo import get_config
    from eapm.predictor import EAPMPredictor, set_score_threshold

    config = YAML if kind == "yaml" else LAZY
    out = tmp_path / "out"
    written = demo.main(
        ["--config-file", config, "--input", *images, "--output", str(out),
         "--confidence-threshold", "0", "--opts", *_weights_opts(kind, weights[kind])]
    )  # fmt: skip
    assert written == [str(out / "img0.png"), str(out / "img1.png")]
    lines = capsys.readouterr().out.strip().splitlines()
    assert [LINE.match(s)["path"] for s in lines] == images
    # the counts printed are the model's detections at threshold 0
    cfg = get_config(config, _weights_opts(kind, weights[kind]))
    set_score_threshold(cfg, 0.0)
    predictor = EAPMPredictor(cfg, "cpu")
    for path, line, drawn in zip(images, lines, written):
        n = len(predictor(read_image(path, format="BGR"))["instances"])
        assert n > 0 and int(LINE.match(line)["n"]) == n
        before = np.asarray(Image.open(path).convert("RGB"))
        after = np.asarray(Image.open(drawn).convert("RGB"))
        assert after.shape == before.shape
        # boxes and labels drawn over the rendered image
        assert (after != _undrawn(path)).any(axis=2).mean() > 0.01


def test_demo_threshold_one_draws_nothing(demo, images, weights, tmp_path, capsys):
    """A threshold no score of the untrained model reaches: no detection, nothing drawn."""
    out = tmp_path / "out"
    demo.main(["--config-file", YAML, "--input", str(os.path.dirname(images[0])) + "/*.png",
               "--output", str(out), "--confidence-threshold", "1",
               "--opts", "MODEL.WEIGHTS", weights["yaml"]])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(LINE.match(s)["n"]) for s in lines] == [0, 0]
    for path in images:
        after = np.asarray(Image.open(out / os.path.basename(path)).convert("RGB"))
        assert np.array_equal(after, _undrawn(path))


def test_predictor_metadata_and_device(weights):
    from eapm.model_zoo import get_config
    from eapm.predictor import EAPMPredictor, set_score_threshold

    for config, kind in ((YAML, "yaml"), (LAZY, "lazy")):
        cfg = get_config(config, _weights_opts(kind, weights[kind]))
        keys = set_score_threshold(cfg, 0.25)
        predictor = EAPMPredictor(cfg, "cpu")
        assert predictor.metadata.thing_classes == ["bar", "ellipse", "triangle", "ring"]
        assert predictor.model.training is False
        assert {p.device.type for p in predictor.model.parameters()} == {"cpu"}
        assert predictor.model.test_score_thresh == 0.25, keys
        assert predictor.input_format == "BGR"
        assert tuple(predictor.aug.short_edge_length) == (128, 128)
        assert predictor.aug.max_size == 128


def test_set_score_threshold_on_rcnn_and_fcos_lazy_configs():
    from eapm.model_zoo import get_config
    from eapm.predictor import set_score_threshold

    cascade = get_config("cascade_rcnn_R_50_FPN_1x.py")
    assert set_score_threshold(cascade, 0.4) == [
        f"model.roi_heads.box_predictors[{i}].test_score_thresh" for i in range(3)
    ]
    assert [p.test_score_thresh for p in cascade.model.roi_heads.box_predictors] == [0.4] * 3
    fcos = get_config("fcos_R_50_FPN_1x.py")
    assert set_score_threshold(fcos, 1.0) == ["model.test_score_thresh"]
    assert fcos.model.test_score_thresh == 0.999  # FCOS's must stay below 1
    faster = get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.py")
    set_score_threshold(faster, 0.3)
    assert faster.model.roi_heads.box_predictor.test_score_thresh == 0.3
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        set_score_threshold(faster, 1.5)


def _error(demo, capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_demo_errors_name_what_is_missing(demo, images, weights, tmp_path, capsys):
    out = str(tmp_path / "out")
    ok = ["--config-file", YAML, "--input", *images, "--output", out]
    msg = _error(demo, capsys, ["--config-file", "no/such.yaml", "--input", *images,
                                "--output", out])  # fmt: skip
    assert msg.endswith("error: config file not found: no/such.yaml (neither a file nor a config "
                        f"of eapm.model_zoo in {os.path.join(REPO, 'configs')})")  # fmt: skip
    missing = str(tmp_path / "nothing*.png")
    msg = _error(demo, capsys, [*ok[:2], "--input", missing, "--output", out])
    assert msg.endswith(f"error: --input: no file matches {missing!r}")
    msg = _error(demo, capsys, [*ok, "--opts", "MODEL.WEIGHTS", str(tmp_path / "none.pth")])
    assert msg.endswith(f"error: weights file not found: {tmp_path / 'none.pth'} (MODEL.WEIGHTS)")
    none = f"train.init_checkpoint={tmp_path / 'none.pth'}"
    msg = _error(demo, capsys, ["--config-file", LAZY, *ok[2:], "--opts", none])
    assert msg.endswith(
        f"error: weights file not found: {tmp_path / 'none.pth'} (train.init_checkpoint)"
    )
    msg = _error(demo, capsys, [*ok[:-1], os.path.dirname(images[0])])
    assert msg.endswith(f"holds the input {images[0]}: it would be overwritten; choose another "
                        "folder")  # fmt: skip
    msg = _error(demo, capsys, ok)  # the quickstart config names no weights
    assert msg.endswith("error: MODEL.WEIGHTS is empty: the config names no trained weights to "
                        "predict with (name a checkpoint, e.g. a training's "
                        "OUTPUT_DIR/model_final.pth)")  # fmt: skip
    assert not os.path.exists(out)  # nothing written


@pytest.mark.slow
def test_demo_command_line(images, weights, tmp_path):
    """The script itself, in its own process, as the README runs it (about 15 s: the
    imports)."""
    proc = subprocess.run(
        [sys.executable, DEMO, "--config-file", os.path.join(REPO, "configs", YAML),
         "--input", *images, "--output", str(tmp_path / "out"), "--confidence-threshold", "0",
         "--opts", "MODEL.WEIGHTS", weights["yaml"]],
        capture_output=True, text=True, timeout=180, env=env(1), cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [LINE.match(s)["path"] for s in lines] == images
    assert all(int(LINE.match(s)["n"]) > 0 for s in lines)
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png"]
