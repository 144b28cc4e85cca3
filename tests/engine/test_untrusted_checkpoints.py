"""Checkpoints are data, through train_net.py: malicious weights (MODEL.WEIGHTS) and a malicious
last checkpoint (--resume) are refused and run nothing; the run's own genuine checkpoints load
for evaluation. (The reader itself, in process: test_safe_load.py; the checkpointer:
test_checkpoint.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import run_train_net, tail, tiny_datasets, tiny_opts, write_malicious


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
