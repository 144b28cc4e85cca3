"""``eapm.model_zoo``: config names with or without their folder, ``get`` (the model of any
config of the project, yacs or LazyConfig, as ``detectron2.model_zoo.get``), and the one
owner of ``get_config_file``."""

from __future__ import annotations

import os

import pytest
import torch

from eapm import model_zoo
from tests.helpers import CONFIGS


def _all_configs():
    out = []
    for root, _, files in os.walk(CONFIGS):
        for f in files:
            if f.endswith((".yaml", ".py")) and not f.startswith("Base-"):
                out.append(os.path.relpath(os.path.join(root, f), CONFIGS))
    return sorted(out)


def test_the_configs_are_those_of_the_checkout():
    assert model_zoo.CONFIGS_DIR == CONFIGS
    assert len(_all_configs()) > 50


def test_config_by_path_by_name_and_absolute():
    quick = os.path.join(CONFIGS, "quickstart", "eapm_retinanet.yaml")
    assert model_zoo.get_config_file("quickstart/eapm_retinanet.yaml") == quick
    assert model_zoo.get_config_file("eapm_retinanet.yaml") == quick  # unique name
    assert model_zoo.get_config_file("eapm_retinanet.py") == quick[: -len("yaml")] + "py"
    assert model_zoo.get_config_file("retinanet_R_50_FPN_1x_eapm_mu1.5.py") == os.path.join(
        CONFIGS, "COCO-Detection", "retinanet_R_50_FPN_1x_eapm_mu1.5.py"
    )
    assert model_zoo.get_config_file(quick) == quick


def test_ambiguous_and_unknown_names(tmp_path, monkeypatch):
    for folder in ("A", "B"):  # the repository's configs have unique names: make two
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    monkeypatch.setattr(model_zoo, "CONFIGS_DIR", str(tmp_path))
    with pytest.raises(ValueError) as e:
        model_zoo.get_config_file("same.yaml")
    assert str(e.value) == (
        f"config name 'same.yaml' is ambiguous: 2 configs in {tmp_path} have it "
        "(A/same.yaml, B/same.yaml); name one with its folder"
    )
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"'nope.yaml' is not among the EAPM configs in "):
        model_zoo.get_config_file("nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"'quickstart/nope.py' is not among the EAPM"):
        model_zoo.get_config_file("quickstart/nope.py")
    with pytest.raises(FileNotFoundError, match=r"^config file not found: /no/such.yaml$"):
        model_zoo.get_config_file("/no/such.yaml")


def test_one_owner_of_get_config_file():
    from eapm.utils import testing

    assert testing.get_config_file is model_zoo.get_config_file
    assert testing.CONFIGS_DIR == model_zoo.CONFIGS_DIR


def test_trained_weights_are_not_published():
    with pytest.raises(RuntimeError) as e:
        model_zoo.get("quickstart/eapm_retinanet.yaml", trained=True)
    assert str(e.value).startswith(
        "no trained weights of the EAPM configs are published yet (quickstart/eapm_retinanet.yaml)"
    )
    with pytest.raises(FileNotFoundError):  # the name is checked first
        model_zoo.get("nope.yaml", trained=True)


def test_default_device(monkeypatch):
    assert model_zoo.default_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_zoo.default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_zoo.default_device() == "cuda"


def _expected_class(config: str) -> str:
    cfg = model_zoo.get_config(config)
    if config.endswith(".yaml"):
        return cfg.MODEL.META_ARCHITECTURE
    return cfg.model._target_.__name__


def _check_model(config: str, **kwargs):
    model = model_zoo.get(config, **kwargs)
    assert type(model).__name__ == _expected_class(config)
    assert model.training  # as detectron2's get: not switched to eval
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    return model


@pytest.mark.parametrize(
    "config", [c for c in _all_configs() if c.startswith("quickstart" + os.sep)]
)
def test_get_builds_every_quickstart_config(config):
    _check_model(config)


def test_get_yacs_and_lazy_twins_build_the_same_model():
    yacs = _check_model("eapm_retinanet.yaml", device="cpu")
    lazy = _check_model("eapm_retinanet.py", device="cpu")
    assert type(yacs).__name__ == type(lazy).__name__ == "EAPMRetinaNet"
    shapes = {n: tuple(p.shape) for n, p in yacs.state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in lazy.state_dict().items()}


def test_get_does_not_load_the_configs_initial_weights(monkeypatch):
    """The COCO configs name ImageNet weights (a download): ``get`` builds without them."""
    from fvcore.common.checkpoint import Checkpointer

    def refuse(*args, **kwargs):
        raise AssertionError("get() loaded weights")

    monkeypatch.setattr(Checkpointer, "load", refuse)
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml")
    assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/")
    _check_model("COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml")


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [c for c in _all_configs() if not c.startswith("quickstart" + os.sep)]
)
def test_get_builds_every_coco_config(config):
    _check_model(config)
