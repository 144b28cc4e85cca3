"""yaml configs are read as data (``eapm.config.merge_config_file``): a ``!!python`` tag is
an error naming the file and the tag, with nothing run, on the yacs and the LazyConfig path
and through train_net.py; a ``_BASE_`` loop or a missing base names the files."""

from __future__ import annotations

import os

import pytest

from eapm.config import ConfigFileError, config_file_chain
from eapm.lazy import load_lazy_config
from eapm.validation import load_config
from tests.helpers import CONFIGS, run_train_net


def _evil(tmp_path, key: str = "OUTPUT_DIR") -> str:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    base = os.path.join(CONFIGS, "quickstart", "retinanet.yaml")
    path.write_text(
        f'_BASE_: "{base}"\n{key}: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    return str(path)


@pytest.mark.parametrize("key", ["OUTPUT_DIR", "NOT_A_KEY"])
def test_a_python_tag_is_refused_naming_file_and_tag_and_runs_nothing(tmp_path, key):
    path = _evil(tmp_path, key)
    for load in (load_config, load_lazy_config):
        with pytest.raises(ConfigFileError) as e:
            load(path)
        assert e.value.path == path
        assert str(e.value).startswith(f"config {path}: ")
        assert "python/object/apply:os.system" in str(e.value) and "(line 2)" in str(e.value)
    assert not (tmp_path / "marker").exists()


def test_train_net_refuses_a_python_tag_before_anything_runs(tmp_path):
    path = _evil(tmp_path)
    proc = run_train_net("--config-file", path, timeout=120)
    assert proc.returncode != 0
    assert f"ConfigFileError: config {path}: " in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "marker").exists()


def test_a_base_loop_names_its_files(tmp_path):
    (tmp_path / "a.yaml").write_text('_BASE_: "b.yaml"\n')
    (tmp_path / "b.yaml").write_text('_BASE_: "a.yaml"\n')
    with pytest.raises(ConfigFileError, match="its _BASE_ chain is a loop: .*a.yaml -> .*b.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_missing_base_names_the_file_that_names_it(tmp_path):
    (tmp_path / "c.yaml").write_text('_BASE_: "missing.yaml"\n')
    with pytest.raises(ConfigFileError, match=r"config .*c.yaml: its _BASE_ .*missing.yaml is"):
        load_config(str(tmp_path / "c.yaml"))


def test_every_config_of_the_repository_reads_as_data():
    for folder, _, names in os.walk(CONFIGS):
        for name in names:
            if name.endswith(".yaml"):
                chain = config_file_chain(os.path.join(folder, name))
                assert all(os.path.isfile(f) for f in chain)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.5"])
def test_iou_balanced_floor_thresh_must_be_finite_and_at_most_one(tmp_path, value):
    path = tmp_path / "floor.yaml"
    base = os.path.join(CONFIGS, "quickstart", "eapm_libra_rcnn.yaml")
    path.write_text(
        f'_BASE_: "{base}"\nMODEL:\n  ROI_HEADS:\n    IOU_BALANCED_FLOOR_THRESH: {value}\n'
    )
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.IOU_BALANCED_FLOOR_THRESH"):
        load_config(str(path))


def test_base_configs_build_on_each_other():
    """The Base-*.yaml of a folder build on each other with _BASE_: only the roots
    (Base-RetinaNet, Base-RCNN-FPN, Base-Shapes) stand alone; the FCOS base inherits
    Base-RetinaNet's anchor and RetinaNet keys, which the FCOS model never reads."""
    roots = {"Base-RetinaNet.yaml", "Base-RCNN-FPN.yaml", "Base-Shapes.yaml"}
    for folder, _, names in os.walk(CONFIGS):
        for name in sorted(n for n in names if n.startswith("Base-") and n.endswith(".yaml")):
            chain = config_file_chain(os.path.join(folder, name))
            assert (len(chain) == 1) == (name in roots), (name, chain)
    from eapm.validation import keys_read_by_model

    cfg = load_config(os.path.join(CONFIGS, "COCO-Detection", "fcos_R_50_FPN_1x.yaml"))
    assert cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA == 0.0  # inherited from Base-RetinaNet
    assert not [k for k in keys_read_by_model(cfg) if "RETINANET" in k or "ANCHOR" in k]
