"""demo/demo.py: a quickstart RetinaNet with the weights of its random initialisation, saved by
``EAPMCheckpointer``, draws its detections on two generated images, for the yacs config and its
LazyConfig twin; the errors name what is missing. (``eapm.predictor``, which it stands on:
tests/test_predictor.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import QUICKSTART_LAZY as LAZY
from tests.helpers import QUICKSTART_YAML as YAML
from tests.helpers import REPO, env, weights_opts

DEMO = os.path.join(REPO, "demo", "demo.py")
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


def _undrawn(path: str) -> np.ndarray:
    """The image as detectron2's Visualizer renders it with nothing drawn (its rendering
    resamples: not the file's pixels)."""
    from detectron2.utils.visualizer import Visualizer

    return Visualizer(np.asarray(Image.open(path).convert("RGB")), None).output.get_image()


@pytest.mark.parametrize("kind", ["yaml", "lazy"])
def test_demo_draws_the_detections(demo, images, initial_weights, tmp_path, capsys, kind):
    from detectron2.data.detection_utils import read_image

    from eapm.model_zoo import get_config
    from eapm.predictor import EAPMPredictor, set_score_threshold

    config = YAML if kind == "yaml" else LAZY
    out = tmp_path / "out"
    written = demo.main(
        ["--config-file", config, "--input", *images, "--output", str(out),
         "--confidence-threshold", "0", "--opts", *weights_opts(kind, initial_weights[kind])]
    )  # fmt: skip
    assert written == [str(out / "img0.png"), str(out / "img1.png")]
    lines = capsys.readouterr().out.strip().splitlines()
    assert [LINE.match(s)["path"] for s in lines] == images
    # the counts printed are the model's detections at threshold 0
    cfg = get_config(config, weights_opts(kind, initial_weights[kind]))
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


def test_demo_threshold_one_draws_nothing(demo, images, initial_weights, tmp_path, capsys):
    """A threshold no score of the untrained model reaches: no detection, nothing drawn."""
    out = tmp_path / "out"
    demo.main(["--config-file", YAML, "--input", str(os.path.dirname(images[0])) + "/*.png",
               "--output", str(out), "--confidence-threshold", "1",
               "--opts", "MODEL.WEIGHTS", initial_weights["yaml"]])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(LINE.match(s)["n"]) for s in lines] == [0, 0]
    for path in images:
        after = np.asarray(Image.open(out / os.path.basename(path)).convert("RGB"))
        assert np.array_equal(after, _undrawn(path))


def _error(demo, capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_demo_errors_name_what_is_missing(demo, images, initial_weights, tmp_path, capsys):
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
def test_demo_command_line(images, initial_weights, tmp_path):
    """The script itself, in its own process, as the README runs it (about 15 s: the
    imports)."""
    proc = subprocess.run(
        [sys.executable, DEMO, "--config-file", os.path.join(REPO, "configs", YAML),
         "--input", *images, "--output", str(tmp_path / "out"), "--confidence-threshold", "0",
         "--opts", "MODEL.WEIGHTS", initial_weights["yaml"]],
        capture_output=True, text=True, timeout=180, env=env(1), cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [LINE.match(s)["path"] for s in lines] == images
    assert all(int(LINE.match(s)["n"]) > 0 for s in lines)
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png"]
