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
import sys
import textwrap
import time

import pytest
import torch

from tests.helpers import (
    REPO,
    env,
    kill_group,
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


def _last_checkpoint(out):
    try:
        return (out / "last_checkpoint").read_text().strip()
    except OSError:
        return ""


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
        proc, lambda: _last_checkpoint(out) == target and _metrics_has(out, 2 * PERIOD - 1)
    )
    kill_group(proc)
    assert reached, "no periodic checkpoint in time:\n" + proc.stderr.read()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    # (a checkpoint being written at the kill is incomplete and not named in last_checkpoint)
    assert _last_checkpoint(out) == target and not (out / "model_final.pth").exists()
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
    name = _last_checkpoint(out)
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
    assert _last_checkpoint(out) == f"model_{PERIOD - 1:07d}.pth"
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
    reached = _wait_for(proc, lambda: _last_checkpoint(out) == second)
    kill_group(proc)
    assert reached
    data = (out / second).read_bytes()
    (out / second).write_bytes(data[: len(data) // 2])  # a truncated file, e.g. a full disk
    log = _resume(tmp_path, out, 1)
    assert re.search(rf"checkpoint {re.escape(str(out / second))} cannot be read", log), log[-3000:]
    assert f"Resumed from {out / f'model_{PERIOD - 1:07d}.pth'}, not from the last" in log
    assert f"Starting training from iteration {PERIOD}" in log
    _assert_bitwise_equal(_final_weights(out), reference(1))


# ---------------------------------------------------------------------------
# units: the loader's position
# ---------------------------------------------------------------------------
def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 3])
def test_index_stream_is_detectron2_training_samplers(world):
    from detectron2.data.samplers import TrainingSampler

    from eapm.data.resumable import ResumableBatchSampler

    for rank in range(world):
        ours = ResumableBatchSampler(7, 1, seed=5, rank=rank, world_size=world)
        theirs = TrainingSampler(7, shuffle=True, seed=5)
        theirs._rank, theirs._world_size = rank, world
        it = iter(theirs)
        assert [b[0][0] for b in _take(iter(ours), 30)] == _take(it, 30)


@pytest.mark.parametrize("buckets", [None, [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]])
def test_state_after_any_batch_resumes_the_same_batches(buckets):
    from eapm.data.resumable import ResumableBatchSampler

    def sampler():
        return ResumableBatchSampler(11, 3, seed=1, rank=1, world_size=2, bucket_of=buckets)

    full = _take(iter(sampler()), 25)
    for n in (0, 4, 13):
        s = sampler()
        _take(iter(s), n + 5)  # handed out beyond batch n, as a prefetching loader does
        state = s.state_after(n)
        resumed = sampler()
        resumed.load_state_dict(state)
        assert _take(iter(resumed), 25 - n - 1) == full[n + 1 :]
    # every position is used once, in order, by this process (1, 3, 5, ... of the stream)
    positions = sorted(p for batch in full for _, p, _ in batch)
    assert positions == sorted(set(positions)) and all(p % 2 == 1 for p in positions)
    if buckets:
        for batch in full:
            assert len({buckets[i] for i, _, _ in batch}) == 1  # one aspect group per batch


@pytest.mark.parametrize("new_world", [1, 3])
def test_regroup_for_another_process_count_continues_the_stream(new_world):
    """A resume state of 2 processes (aspect-ratio buckets: they took different numbers of
    stream elements) loaded by ``new_world`` processes: the normalisers' mean, no bucket
    carried over, and the new processes together take the stream from the element after the
    furthest one any saved process took, each element once, without a gap."""
    from eapm.data.resumable import ResumableBatchSampler
    from eapm.engine.hooks import _regroup

    buckets = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]

    def sampler(rank, world, bucket_of=buckets):
        return ResumableBatchSampler(
            11, 2, seed=4, rank=rank, world_size=world, bucket_of=bucket_of
        )

    ranks = []
    for rank, normalizer in ((0, 10.0), (1, 30.0)):
        s = sampler(rank, 2)
        _take(iter(s), 5)
        ranks.append({"loss_normalizers": {"": normalizer}, "loader": s.state_after(3)})
    saved = {"world_size": 2, "ranks": ranks}
    used = {r + j * 2 for r in (0, 1) for j in range(ranks[r]["loader"]["next"])}
    assert ranks[0]["loader"]["next"] != ranks[1]["loader"]["next"]  # buckets differ
    end = max(used) + 1

    taken = []
    for rank in range(new_world):
        normalizers, loader = _regroup(saved, new_world, rank)
        assert normalizers == {"": 20.0}
        assert loader["seed"] == 4 and loader["buckets"] == [[], []]
        s = sampler(rank, new_world, None)  # one bucket: consecutive elements form a batch
        s.load_state_dict({**loader, "buckets": [[]]})
        taken += [pos for batch in _take(iter(s), 3) for _, pos, _ in batch]
    assert sorted(taken) == list(range(end, end + 6 * new_world))

    # a saved process without a resumable loader: no loader position for anyone
    ranks[1] = {**ranks[1], "loader": None}
    assert _regroup(saved, new_world, 0)[1] is None


def test_augmentations_depend_only_on_seed_and_position():
    import numpy as np

    from eapm.data.resumable import SeededMapDataset

    def mapper(d):
        return (d["id"], np.random.rand(), torch.rand(1).item(), __import__("random").random())

    ds = SeededMapDataset([{"id": i} for i in range(4)], mapper)
    a = [ds[(i, p, 9)] for i, p in ((0, 0), (1, 1), (2, 2))]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    b = [ds[(i, p, 9)] for i, p in ((2, 2), (0, 0), (1, 1))]
    assert sorted(a) == sorted(b)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generators untouched
    assert ds[(0, 0, 9)] != ds[(0, 4, 9)] != ds[(0, 0, 10)]


# ---------------------------------------------------------------------------
# units: checkpoint files
# ---------------------------------------------------------------------------
def _checkpointer(tmp_path):
    from eapm.checkpoint import EAPMCheckpointer

    model = torch.nn.Linear(3, 2)
    return model, EAPMCheckpointer(model, str(tmp_path))


def test_a_failed_save_leaves_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000004")
    good = (tmp_path / "model_0000004.pth").read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000009")
    assert not (tmp_path / "model_0000009.pth").exists()
    assert not list(tmp_path.glob("*.tmp.*"))  # the temporary file was removed
    assert (tmp_path / "model_0000004.pth").read_bytes() == good
    assert _last_checkpoint(tmp_path) == "model_0000004.pth"


def test_damaged_checkpoints_fall_back_then_fail_naming_every_file(tmp_path, caplog):
    from eapm.checkpoint import DamagedCheckpointError

    model, ckpt = _checkpointer(tmp_path)
    for it in (4, 9, 14):
        with torch.no_grad():
            model.weight.fill_(it)
        ckpt.save(f"model_{it:07d}")
    (tmp_path / "model_0000014.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "model_0000009.pth").unlink()  # listed nowhere any more: skipped silently
    with torch.no_grad():
        model.weight.zero_()
    ckpt.resume_or_load("", resume=True)
    assert float(model.weight[0, 0]) == 4.0
    assert "model_0000014.pth cannot be read" in caplog.text
    (tmp_path / "model_0000004.pth").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match="no readable checkpoint") as e:
        ckpt.resume_or_load("", resume=True)
    assert "model_0000014.pth" in str(e.value) and "model_0000004.pth" in str(e.value)


def test_preemption_keys_validated():
    import eapm

    cfg_file = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.yaml")
    with pytest.raises(ValueError, match=r"^Invalid config SOLVER\.PREEMPTION\.SIGNALS"):
        eapm.load_config(cfg_file, ["SOLVER.PREEMPTION.SIGNALS", "['SIGKILL']"])
    with pytest.raises(ValueError, match=r"^Invalid config SOLVER\.PREEMPTION\.EXIT_CODE"):
        eapm.load_config(cfg_file, ["SOLVER.PREEMPTION.EXIT_CODE", "0"])
    with pytest.raises(ValueError, match=r"^Invalid config DATALOADER\.SAMPLER_TRAIN"):
        eapm.load_config(cfg_file, ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"])
    assert sys.modules["eapm"].load_config(cfg_file).SOLVER.PREEMPTION.EXIT_CODE == 75


def test_a_process_exits_with_the_training_loader_still_iterating():
    """The loader's workers ignore SIGTERM (preemption safety); multiprocessing's exit
    handler stops daemonic children with SIGTERM and then waits for them. A script that
    exits with the loader's iterator alive must still exit (it used to hang forever)."""
    script = textwrap.dedent(
        """
        import torch
        from eapm.data.resumable import ResumableBatchSampler, _PreemptionSafeLoader, _worker_init

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, key):
                return key[0]

        loader = _PreemptionSafeLoader(
            Items(),
            batch_sampler=ResumableBatchSampler(8, 2, seed=3),
            num_workers=1,
            collate_fn=list,
            worker_init_fn=_worker_init,
        )
        it = iter(loader)
        print("batch", next(it), flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("the process did not exit with the loader's iterator alive (hung at exit)")
    assert proc.returncode == 0, err[-2000:]
    assert out.startswith("batch ["), out
