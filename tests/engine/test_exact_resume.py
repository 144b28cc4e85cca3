"""Preemption-safe, exactly resumable training, with either spelling of the quickstart run
(the yacs config and its LazyConfig twin: one engine).

End to end (train_net.py subprocesses, tiny model and data, CPU, EAPM on): a run killed
with SIGKILL after a periodic checkpoint, or stopped by SIGTERM at an arbitrary
iteration (exit status 75), or killed in the middle of writing a checkpoint, or left with a
damaged last checkpoint, ends after --resume with weights bitwise identical to the
uninterrupted run, and nothing written before the kill (checkpoints, metrics, log) is lost;
with one process and with two (GLOO). Unit tests: the loader's index stream is
detectron2's, its position after any batch resumes the same batches, the augmentations
depend only on (seed, position), checkpoint files are written atomically, and a damaged
checkpoint is skipped naming the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import textwrap
import time

import pytest
import torch

from tests.helpers import (
    REPO,
    env,
    kill_group,
    last_checkpoint,
    read_metrics,
    run_train_net,
    tail,
    tiny_datasets,
    tiny_opts,
    train_net_cmd,
)

CONFIG = {
    "yacs": ["--config-file", "configs/quickstart/eapm_retinanet.yaml"],
    "lazy": ["--config-file", "configs/quickstart/eapm_retinanet.py"],
}
MAX_ITER = 30
PERIOD = 10


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _lazy_opts(out, period):
    """The LazyConfig twin of ``tiny_opts``: the tiny datasets, 2 images per iteration, one
    loader worker, no BatchNorm in the head (one image per process with two), MAX_ITER
    iterations with the yacs warm-up of 2 and no steps. (The images keep the config's 128 px:
    a list element cannot be overridden on the command line.)"""
    return [
        "dataloader.train.dataset.names=tiny_train",
        "dataloader.test.dataset.names=tiny_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=1",
        "dataloader.test.num_workers=0",
        "model.num_classes=2",
        "model.head.norm=",
        f"train.max_iter={MAX_ITER}",
        f"train.checkpointer.period={period}",
        f"lr_multiplier.warmup_length={2 / MAX_ITER}",
        "lr_multiplier.scheduler.values=[1.0]",
        "lr_multiplier.scheduler.milestones=[]",
        f"lr_multiplier.scheduler.num_updates={MAX_ITER}",
        f"train.output_dir={out}",
    ]


def _args(tmp_path, out, processes=1, spelling="yacs", period=PERIOD):
    data = tiny_datasets(str(tmp_path / "data"))
    if spelling == "yacs":
        opts = tiny_opts(
            str(out),
            MAX_ITER,
            str(tmp_path / "no_embedded"),
            **{"SOLVER.CHECKPOINT_PERIOD": str(period), "DATALOADER.NUM_WORKERS": "1"},
        )
    else:
        opts = _lazy_opts(out, period)
    launcher = ["--num-gpus", str(processes), "--dist-url", "auto"] if processes > 1 else []
    return [*launcher, *CONFIG[spelling], *data, *opts]


def _final_weights(out):
    return torch.load(out / "model_final.pth", map_location="cpu")["model"]


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _start(args, extra_env=None):
    e = env()
    e.update(extra_env or {})
    return subprocess.Popen(
        train_net_cmd(*args),
        cwd=REPO,
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group: signal it as a cluster would
    )


def _wait_for(proc, cond, timeout=200):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _finish(proc, timeout=120):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs' final weights, by number of processes and spelling (computed
    lazily)."""
    cache = {}

    def get(processes, spelling="yacs"):
        if (processes, spelling) not in cache:
            tmp = tmp_path_factory.mktemp(f"reference_{spelling}{processes}")
            out = tmp / "out"
            done = run_train_net(*_args(tmp, out, processes, spelling), timeout=300)
            assert done.returncode == 0, tail(done)
            cache[processes, spelling] = _final_weights(out)
        return cache[processes, spelling]

    return get


def _resume(tmp_path, out, processes, spelling="yacs"):
    done = run_train_net("--resume", *_args(tmp_path, out, processes, spelling), timeout=300)
    assert done.returncode == 0, tail(done)
    return (out / "log.txt").read_text()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _metrics_has(out, it):
    try:
        return any(m.get("iteration") == it for m in read_metrics(str(out)))
    except ValueError:  # a line being written
        return False


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("spelling,processes", [("yacs", 1), ("yacs", 2), ("lazy", 1)])
def test_sigkill_after_periodic_checkpoint_then_resume_is_bitwise_identical(
    tmp_path, reference, spelling, processes
):
    """SIGKILL right after the second periodic checkpoint (iteration 19, when detectron2's
    writer has also written the metrics of iteration 19), --resume: it continues from that
    checkpoint to the end (final model and evaluation), nothing written before the kill is
    lost (checkpoints unchanged; metrics.json and log.txt appended to), and the final weights
    are bitwise those of the uninterrupted run."""
    out = tmp_path / "out"
    target = f"model_{2 * PERIOD - 1:07d}.pth"
    proc = _start(_args(tmp_path, out, processes, spelling))
    reached = _wait_for(
        proc, lambda: last_checkpoint(out) == target and _metrics_has(out, 2 * PERIOD - 1)
    )
    kill_group(proc)
    assert reached, "no periodic checkpoint in time:\n" + proc.stderr.read()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    # (a checkpoint being written at the kill is incomplete and not named in last_checkpoint)
    assert last_checkpoint(out) == target and not (out / "model_final.pth").exists()
    before = {p.name: _md5(p) for p in out.glob("model_0*.pth") if p.name <= target}
    assert set(before) == {f"model_{PERIOD - 1:07d}.pth", target}
    metrics_before = (out / "metrics.json").read_text()
    log_before = (out / "log.txt").read_text()

    log = _resume(tmp_path, out, processes, spelling)
    assert f"Loading from {out / target}" in log
    assert f"Starting training from iteration {2 * PERIOD}" in log
    assert torch.load(out / "model_final.pth", map_location="cpu")["iteration"] == MAX_ITER - 1
    assert list(out.glob("inference/**/coco_instances_results.json"))
    for name, digest in before.items():
        assert _md5(out / name) == digest, name
    assert (out / "metrics.json").read_text().startswith(metrics_before)
    assert log.startswith(log_before)
    metrics = read_metrics(str(out))
    its = [m["iteration"] for m in metrics if "total_loss" in m]
    assert 2 * PERIOD - 1 in its and its[-1] == MAX_ITER - 1 and its == sorted(its)
    assert "bbox/AP" in metrics[-1]  # the final evaluation
    _assert_bitwise_equal(_final_weights(out), reference(processes, spelling))


@pytest.mark.slow
@pytest.mark.parametrize("spelling,processes", [("yacs", 1), ("yacs", 2), ("lazy", 1), ("lazy", 2)])
def test_sigterm_at_an_arbitrary_iteration_checkpoints_exits_75_and_resumes_exactly(
    tmp_path, reference, spelling, processes
):
    out = tmp_path / "out"
    # no periodic checkpoint anywhere near: the signal's checkpoint is the only one
    args = _args(tmp_path, out, processes, spelling, period=1000)
    proc = _start(args)
    # some iterations in (detectron2 logs iteration 19), at whichever iteration is running
    started = _wait_for(proc, lambda: " iter: 19 " in _log(out))
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # a second signal changes nothing
    err = _finish(proc)
    assert started, err[-3000:]
    assert proc.returncode == 75, err[-3000:]
    name = last_checkpoint(out)
    assert re.fullmatch(r"model_\d{7}\.pth", name), name
    stopped_at = int(name[6:13])
    assert 19 <= stopped_at < MAX_ITER - 1 and not (out / "model_final.pth").exists()
    assert "Received SIGTERM: checkpointing after this iteration" in _log(out)
    assert torch.load(out / name, map_location="cpu")["iteration"] == stopped_at
    log = _resume(tmp_path, out, processes, spelling)
    assert f"Starting training from iteration {stopped_at + 1}" in log
    _assert_bitwise_equal(_final_weights(out), reference(processes, spelling))


def _log(out):
    try:
        return (out / "log.txt").read_text()
    except OSError:
        return ""


KILL_IN_SAVE = textwrap.dedent(
    """
    # test-only: SIGKILL this process halfway through writing the checkpoint whose file
    # name ends with $EAPM_TEST_KILL_SAVING (as a node dying during a save would)
    import os, signal
    import torch

    _save = torch.save

    def save(obj, f, *args, **kwargs):
        if getattr(f, "path", "").endswith(os.environ["EAPM_TEST_KILL_SAVING"]):
            f.write(b"PK\\x03\\x04" + b"\\0" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *args, **kwargs)

    torch.save = save
    """
)


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_then_resume_from_the_last_good_one(tmp_path, reference):
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_SAVE)
    second = f"model_{2 * PERIOD - 1:07d}.pth"
    proc = _start(
        _args(tmp_path, out),
        {"PYTHONPATH": str(hook), "EAPM_TEST_KILL_SAVING": second},
    )
    err = _finish(proc, timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    # the interrupted save left a temporary file only: last_checkpoint names the good one
    assert last_checkpoint(out) == f"model_{PERIOD - 1:07d}.pth"
    assert not (out / second).exists()
    assert [p.name for p in out.glob(second + ".tmp.*")]
    log = _resume(tmp_path, out, 1)
    assert f"Starting training from iteration {PERIOD}" in log
    _assert_bitwise_equal(_final_weights(out), reference(1))


@pytest.mark.slow
def test_damaged_last_checkpoint_named_and_previous_one_used(tmp_path, reference):
    out = tmp_path / "out"
    proc = _start(_args(tmp_path, out))
    second = f"model_{2 * PERIOD - 1:07d}.pth"
    reached = _wait_for(proc, lambda: last_checkpoint(out) == second)
    kill_group(proc)
    assert reached
    data = (out / second).read_bytes()
    (out / second).write_bytes(data[: len(data) // 2])  # a truncated file, e.g. a full disk
    log = _resume(tmp_path, out, 1)
    assert re.search(rf"checkpoint {re.escape(str(out / second))} cannot be read", log), log[-3000:]
    assert f"Resumed from {out / f'model_{PERIOD - 1:07d}.pth'}, not from the last" in log
    assert f"Starting training from iteration {PERIOD}" in log
    _assert_bitwise_equal(_final_weights(out), reference(1))
