"""Kill and resume: a training run is SIGKILLed right after a periodic checkpoint,
restarted with --resume, continues from that iteration to the end, and nothing written
before the kill (checkpoints, metrics.json lines, log) is lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest
import torch
from tests.helpers import REPO
from tests.helpers import env, read_metrics, run_train_net, tail, tiny_datasets, tiny_opts, train_net_cmd

CONFIG = ["--config-file", "configs/quickstart/eapm_retinanet.yaml"]
MAX_ITER = 40
PERIOD = 5
KILL_AFTER = 19  # detectron2's PeriodicWriter writes metrics.json every 20 iterations (19, 39, ...)


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _last_checkpoint_iter(out):
    """The iteration of the checkpoint named in OUTPUT_DIR/last_checkpoint, or -1."""
    try:
        name = (out / "last_checkpoint").read_text().strip()
    except OSError:
        return -1
    return (
        int(name[len("model_") : -len(".pth")])
        if name.startswith("model_") and name[6:-4].isdigit()
        else -1
    )


def _metrics_has(out, it):
    try:
        return any(m.get("iteration") == it for m in read_metrics(str(out)))
    except ValueError:  # a line being written
        return False


@pytest.mark.slow
def test_kill_and_resume(tmp_path):
    data = tiny_datasets(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = [
        *CONFIG,
        *data,
        *tiny_opts(
            str(out),
            MAX_ITER,
            str(tmp_path / "no_embedded"),
            **{"SOLVER.CHECKPOINT_PERIOD": str(PERIOD)},
        ),
    ]
    # own session: SIGKILL the whole process group, as a preempted node would
    proc = subprocess.Popen(
        train_net_cmd(*args),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 200
    try:
        while time.time() < deadline and proc.poll() is None:
            if _last_checkpoint_iter(out) >= KILL_AFTER and _metrics_has(out, KILL_AFTER):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "not killed in time:\n" + proc.stderr.read()[-4000:]
    killed_at = _last_checkpoint_iter(out)
    assert KILL_AFTER <= killed_at < MAX_ITER - 1
    target = f"model_{killed_at:07d}.pth"
    assert not (out / "model_final.pth").exists()

    # (a checkpoint being written at the kill is incomplete and not named in last_checkpoint)
    before = {p.name: _md5(p) for p in out.glob("model_0*.pth") if int(p.name[6:-4]) <= killed_at}
    metrics_before = (out / "metrics.json").read_text()
    log_before = (out / "log.txt").read_text()
    assert {f"model_{i:07d}.pth" for i in range(PERIOD - 1, killed_at + 1, PERIOD)} <= set(before)

    resumed = run_train_net("--resume", *args, timeout=240)
    assert resumed.returncode == 0, tail(resumed)
    log = (out / "log.txt").read_text()
    # it resumed from the checkpoint of the last finished iteration
    assert f"Loading from {out / target}" in log
    assert f"Starting training from iteration {killed_at + 1}" in log
    # ran to the end: final model (saved at the last iteration) and evaluation results
    assert torch.load(out / "model_final.pth", map_location="cpu")["iteration"] == MAX_ITER - 1
    assert (out / "inference" / "tiny_val" / "coco_instances_results.json").is_file()
    # nothing written before the kill is lost: checkpoints unchanged, metrics / log appended to
    for name, digest in before.items():
        assert _md5(out / name) == digest, name
    assert (out / "metrics.json").read_text().startswith(metrics_before)
    assert log.startswith(log_before)
    metrics = read_metrics(str(out))
    its = [m["iteration"] for m in metrics if "total_loss" in m]
    assert KILL_AFTER in its and its[-1] == MAX_ITER - 1 and its == sorted(its)
    assert (
        "bbox/AP" in metrics[-1]
    )  # the final evaluation (detectron2 logs it at iteration MAX_ITER)
