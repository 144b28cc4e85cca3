"""Your module, your keys, no wrapper: ``train_net.py --import MODULE`` / ``eapm.load_config(
imports=...)`` import a user's module before the config is loaded and apply its
``add_config(cfg)``, so a config file and the command line can set its keys and a model it
registers trains; errors in the module name it."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from eapm.validation import load_config
from tests.helpers import CONFIGS, REPO, env, tail, tiny_datasets, tiny_opts, train_net_cmd

USER_MODULE = """
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage

from eapm.modeling import EAPMRetinaNet


def add_config(cfg):
    cfg.MODEL.MY_SL1_THETA = 0.0  # a user's key, with its default


@META_ARCH_REGISTRY.register()
class {name}(EAPMRetinaNet):
    @classmethod
    def from_config(cls, cfg):
        return dict(super().from_config(cfg), my_theta=cfg.MODEL.MY_SL1_THETA)

    @configurable
    def __init__(self, *, my_theta, **kwargs):
        super().__init__(**kwargs)
        self.my_theta = my_theta

    def losses(self, *args, **kwargs):
        get_event_storage().put_scalar("my/theta", self.my_theta, smoothing_hint=False)
        return super().losses(*args, **kwargs)
"""


def _module(tmp_path, monkeypatch, body: str) -> str:
    name = f"user_mod_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body).replace("{name}", f"My{name}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_load_config_applies_the_modules_keys_before_the_file_and_opts(tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, USER_MODULE)
    path = tmp_path / "mine.yaml"
    base = os.path.join(CONFIGS, "quickstart", "eapm_retinanet.yaml")
    path.write_text(
        f'_BASE_: "{base}"\nMODEL:\n  MY_SL1_THETA: 0.5\n  META_ARCHITECTURE: My{name}\n'
    )
    cfg = load_config(str(path), imports=[name])
    assert cfg.MODEL.MY_SL1_THETA == 0.5 and cfg.MODEL.META_ARCHITECTURE == f"My{name}"
    cfg = load_config(str(path), ["MODEL.MY_SL1_THETA", "0.25"], imports=[name])
    assert cfg.MODEL.MY_SL1_THETA == 0.25
    with pytest.raises(KeyError, match="MY_SL1_THETA"):  # without the module: not a key
        load_config(str(path))


@pytest.mark.parametrize(
    "body, error, match",
    [
        (None, ImportError, r"--import eapm_no_such_module: importing it failed: "),
        (
            "raise ValueError('broken')\n",
            ImportError,
            r"--import user_mod_\d+: .*ValueError: broken",
        ),
        (
            "def add_config(cfg):\n    cfg.X.Y = 1\n",
            RuntimeError,
            r"user_mod_\d+\.add_config\(cfg\)",
        ),
    ],
)
def test_errors_in_the_users_module_name_it(tmp_path, monkeypatch, body, error, match):
    name = "eapm_no_such_module" if body is None else _module(tmp_path, monkeypatch, body)
    with pytest.raises(error, match=match):
        load_config(os.path.join(CONFIGS, "quickstart", "retinanet.yaml"), imports=[name])


@pytest.mark.slow
def test_train_net_trains_a_users_model_with_its_key(tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, USER_MODULE)
    out = str(tmp_path / "out")
    opts = tiny_opts(out, 2, str(tmp_path / "embedded"), **{
        "MODEL.META_ARCHITECTURE": f"My{name}", "MODEL.MY_SL1_THETA": "0.25",
        "DATASETS.TEST": "()"})  # fmt: skip
    cmd = train_net_cmd(
        "--import", name, *tiny_datasets(str(tmp_path / "data")),
        "--config-file", "configs/quickstart/eapm_retinanet.yaml", *opts,
    )  # fmt: skip
    environ = dict(env(1), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["my/theta"] for r in rows if "my/theta" in r] and all(
        r["my/theta"] == 0.25 for r in rows if "my/theta" in r
    )
