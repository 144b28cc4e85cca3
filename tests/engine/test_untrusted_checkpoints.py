"""Checkpoints are data: a file that would run code (a pickle payload of any protocol, in a
``.pkl``, torch zip or legacy file, a TorchScript archive, BUILD on a global) is refused,
names the file and runs nothing; a storage that claims more than its record holds is
refused; every failure to read a file is one of the two named errors; genuine detectron2,
Caffe2 / MSRA, torchvision-converted and own files of every protocol load."""

from __future__ import annotations

import collections
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from eapm.safe_load import DamagedCheckpointError, UnsafeCheckpointError, load_checkpoint_file
from tests.helpers import REPO, run_train_net, tail, tiny_datasets, tiny_opts


class _RunsCommand:
    """Unpickling this runs ``touch <marker>`` (as a malicious checkpoint would)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: str, marker: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> str:
    """A checkpoint of the right shape whose loading would create ``marker``: ``.pkl`` as
    detectron2's model zoo format, anything else as ``torch.save`` writes it."""
    payload = {"model": {"w": np.ones(2, np.float32)}, "__author__": "x", "x": _RunsCommand(marker)}
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
    else:
        payload["model"] = {"w": torch.ones(2)}
        torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "name, protocol", [("evil.pth", 2), ("evil.pkl", 2), ("evil_p4.pkl", 4), ("evil.pyth", 2)]
)
def test_a_checkpoint_that_would_run_a_command_is_refused_and_runs_nothing(
    tmp_path, name, protocol
):
    marker = str(tmp_path / "marker")
    path = write_malicious(str(tmp_path / name), marker, protocol)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint_file(path)
    assert not os.path.exists(marker)
    assert e.value.path == path and path in str(e.value)
    assert e.value.refused == "the global posix.system"


def test_numpy_in_a_torch_file_is_read_but_a_command_beside_it_is_refused(tmp_path):
    # the numpy fallback (files of earlier versions) must not open the door to anything else
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "mixed.pth")
    torch.save({"model": {}, "np": np.random.get_state(), "x": _RunsCommand(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_checkpoint_file(path)
    assert not os.path.exists(marker)


def test_genuine_files_of_each_kind_load(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    # detectron2 model zoo .pkl (protocol 2, as detectron2's converters write it)
    d2 = str(tmp_path / "d2.pkl")
    with open(d2, "wb") as f:
        pickle.dump({"model": {"a.weight": w}, "__author__": "torchvision"}, f, protocol=2)
    assert np.array_equal(load_checkpoint_file(d2)["model"]["a.weight"], w)
    # Caffe2 / MSRA ImageNet weights: {"blobs": {name: ndarray}} with numpy scalars
    c2 = str(tmp_path / "R-50.pkl")
    with open(c2, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": w, "lr": np.float32(0.1)}}, f, protocol=2)
    blobs = load_checkpoint_file(c2)["blobs"]
    assert np.array_equal(blobs["conv1_w"], w) and blobs["lr"] == np.float32(0.1)
    # numpy arrays as protocol 5 pickles them (numpy.core.numeric._frombuffer)
    p5 = str(tmp_path / "p5.pkl")
    with open(p5, "wb") as f:
        pickle.dump({"model": {"a.weight": w}, "__author__": "x"}, f, protocol=5)
    assert np.array_equal(load_checkpoint_file(p5)["model"]["a.weight"], w)
    # a torchvision-style state dict and a detectron2 checkpoint (.pth)
    tv = str(tmp_path / "tv.pth")
    torch.save(collections.OrderedDict(weight=torch.ones(2, 2)), tv)
    assert torch.equal(load_checkpoint_file(tv)["weight"], torch.ones(2, 2))
    # a checkpoint holding NumPy's generator state (a NumPy array) is readable
    old = str(tmp_path / "model_0000009.pth")
    state = np.random.get_state()
    torch.save(
        {"model": {"w": torch.ones(1)}, "iteration": 9, "np": state, "py": random.getstate()}, old
    )
    data = load_checkpoint_file(old)
    assert data["iteration"] == 9 and np.array_equal(data["np"][1], state[1])


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x80\x02not a checkpoint" * 8)
    with pytest.raises(DamagedCheckpointError) as e:
        load_checkpoint_file(str(path))
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_convert_checkpoint_checks_and_converts_a_trusted_file(tmp_path):
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    marker = str(tmp_path / "marker")
    evil = write_malicious(str(tmp_path / "evil.pth"), marker)
    check = subprocess.run([sys.executable, tool, evil], capture_output=True, text=True)
    assert check.returncode == 1 and "REFUSED" in check.stderr and evil in check.stderr
    assert not os.path.exists(marker)
    old = str(tmp_path / "old.pth")
    torch.save({"model": {"w": torch.ones(2)}, "np": np.random.get_state()}, old)
    out = str(tmp_path / "new.pth")
    conv = subprocess.run(
        [sys.executable, tool, "--trust-source", old, out], capture_output=True, text=True
    )
    assert conv.returncode == 0, conv.stderr
    data = torch.load(out, weights_only=True)  # plain torch can read it as data now
    assert torch.equal(data["model"]["w"], torch.ones(2)) and data["np"][0] == "MT19937"


# ---------------------------------------------------------------- through train_net.py
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_train_net_refuses_malicious_weights_and_runs_nothing(tmp_path, suffix):
    marker = str(tmp_path / "marker")
    weights = write_malicious(str(tmp_path / f"evil{suffix}"), marker)
    out = str(tmp_path / "out")
    proc = run_train_net(
        *tiny_datasets(str(tmp_path / "data")),
        "--config-file",
        "configs/quickstart/eapm_retinanet.yaml",
        *tiny_opts(out, 2, str(tmp_path / "embedded"), **{"MODEL.WEIGHTS": weights}),
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eapm.safe_load.UnsafeCheckpointError: checkpoint " + weights), last
    assert "posix.system" in last
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))  # it never trained


@pytest.mark.slow
def test_resume_refuses_a_malicious_last_checkpoint_and_runs_nothing(tmp_path):
    marker = str(tmp_path / "marker")
    out = str(tmp_path / "out")
    args = [
        *tiny_datasets(str(tmp_path / "data")),
        "--resume",  # the first run has nothing to resume: it trains from scratch
        "--config-file",
        "configs/quickstart/eapm_retinanet.yaml",
        *tiny_opts(out, 2, str(tmp_path / "embedded"), **{"SOLVER.CHECKPOINT_PERIOD": "1"}),
    ]
    first = run_train_net(*args)
    assert first.returncode == 0, tail(first)
    # a planted last checkpoint: the resume must refuse it, not fall back past it
    evil = write_malicious(os.path.join(out, "model_0000009.pth"), marker)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")
    proc = run_train_net(*args)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eapm.safe_load.UnsafeCheckpointError: checkpoint " + evil), last
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_genuine_own_checkpoints_load_for_evaluation(tmp_path):
    out = str(tmp_path / "out")
    data = tiny_datasets(str(tmp_path / "data"))
    cfg = ["--config-file", "configs/quickstart/eapm_retinanet.yaml"]
    embedded = str(tmp_path / "embedded")
    trained = run_train_net(*data, *cfg, *tiny_opts(out, 2, embedded))
    assert trained.returncode == 0, tail(trained)
    final = os.path.join(out, "model_final.pth")
    assert torch.load(final, weights_only=True)["iteration"] == 1  # plain torch reads it as data
    opts = tiny_opts(str(tmp_path / "eval"), 2, embedded, **{"MODEL.WEIGHTS": final})
    evaluated = run_train_net(*data, *cfg, "--eval-only", *opts)
    assert evaluated.returncode == 0, tail(evaluated)
    assert "copypaste: " in evaluated.stdout + evaluated.stderr
