"""Training hooks that any detectron2 trainer can register (``trainer.register_hooks``), in
the style of ``detectron2.engine.hooks``; ``EAPMTrainer`` (yacs) and the LazyConfig loop
(``eapm.lazy``) register the same two:

* ``ResumeState``: what decides the next iteration beyond detectron2's model, optimizer,
  scheduler and iteration, per process: the random generators (Python, NumPy, torch, CUDA),
  the EMA loss normalisers of the ``DenseDetector`` modules and the position of an exactly
  resumable training loader (``eapm.data.resumable``). It is the hook's ``state_dict``, so
  the trainer's checkpoint holds it (``trainer["hooks"]["ResumeState"]``); loading the
  checkpoint restores it, regrouped when the number of processes changed.
* ``PreemptibleCheckpointer``: detectron2's periodic checkpointer, in every process, that
  also stops on a preemption signal: the processes agree on the last iteration, one
  checkpoint is written at it, and the job exits with ``Preempted(exit_code)``.

Evaluation during training (``EAPMTrainer.test``, the LazyConfig loop's ``EvalHook``) runs inside
``rng_isolated``: it leaves the random generators as it found them (iterating a DataLoader
draws its base seed from torch's global generator), so that a training with periodic
evaluation takes the same steps as one without, and a resumed one the same as an uninterrupted
one (the checkpoint, written before the evaluation, holds the generators' states).

The launcher's half of preemption (forwarding the signals to the worker processes, turning
their exit status into the launcher's) is ``eapm.engine.launch.preemption_exit``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
from typing import Optional, Sequence

import numpy as np
import torch
from detectron2.engine import hooks
from detectron2.engine.train_loop import HookBase
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils import comm

from ..data.resumable import ResumableBatchSampler
from ..losses.checks import is_number

__all__ = [
    "Preempted",
    "PreemptibleCheckpointer",
    "ResumeState",
    "close_train_loader",
    "preemption_signals",
    "rng_isolated",
]

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised (a SystemExit with the configured exit status) after the checkpoint of a
    preempted run is written."""


def preemption_signals(names: Sequence[str]) -> list:
    """The ``signal.Signals`` of ``names`` (e.g. ``["SIGTERM", "SIGUSR1"]``).

    Raises ``ValueError`` naming the first name that is not a signal a process can handle
    (SIGKILL and SIGSTOP cannot be)."""
    ret = []
    for name in names:
        sig = getattr(signal.Signals, str(name), None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name!r} is not a signal a training process can handle")
        ret.append(sig)
    return ret


def check_preemption_config(cfg) -> None:
    """The rules of SOLVER.PREEMPTION (the signals, ``preemption_signals``; the exit code an
    integer in [1, 255]), applied when the config is loaded: ``ValueError`` naming the key."""
    from ..config import invalid

    p = cfg.SOLVER.PREEMPTION
    if not isinstance(p.SIGNALS, (list, tuple)):
        raise invalid("SOLVER.PREEMPTION.SIGNALS", p.SIGNALS, "must be a list of signal names")
    try:
        preemption_signals(p.SIGNALS)
    except ValueError as e:
        raise invalid("SOLVER.PREEMPTION.SIGNALS", p.SIGNALS, str(e)) from None
    code = p.EXIT_CODE
    if not (is_number(code, integer=True) and 1 <= code <= 255):
        raise invalid("SOLVER.PREEMPTION.EXIT_CODE", code, "must be an integer in [1, 255]")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def close_train_loader(trainer) -> None:
    """Shuts the training loader's iterator (and its worker processes) of a detectron2
    trainer down now; a later iteration would start a new one."""
    inner = getattr(trainer, "_trainer", trainer)  # DefaultTrainer runs a SimpleTrainer
    loader = inner.data_loader
    inner.reset_data_loader(lambda: loader)  # drops the iterator: its workers stop


def _rng_state() -> dict:
    """The global random generators' states as tensors, numbers and strings (a checkpoint
    that ``torch.load(weights_only=True)`` reads): NumPy's key array as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restores ``_rng_state()``."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_isolated():
    """Restores the global random generators (Python, NumPy, torch, CUDA) on exit to their
    states on entry, whatever the block drew from them."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def _regroup(saved: dict, world: int, rank: int):
    """(loss normalisers, loader state) of process ``rank`` of ``world`` from a resume
    state written by another number of processes: the normalisers' mean, and the position
    after the furthest stream element any saved process had taken (buckets dropped). The
    new processes together continue the stream at that element without a gap: process
    ``r`` takes the elements ``r + k * world`` for ``k >= next``. The loader state is None
    when any saved process had none."""
    ranks = saved["ranks"]
    normalizers = {}
    for name in set().union(*(r["loss_normalizers"] for r in ranks)):
        values = [r["loss_normalizers"][name] for r in ranks if name in r["loss_normalizers"]]
        normalizers[name] = float(np.mean(values))
    if any(r["loader"] is None for r in ranks):
        return normalizers, None
    # the furthest element taken: process i took i, i + world_size, ... (``next`` of them)
    taken = [
        i + (r["loader"]["next"] - 1) * saved["world_size"]
        for i, r in enumerate(ranks)
        if r["loader"]["next"] > 0
    ]
    end = max(taken) + 1 if taken else 0
    loader = dict(ranks[0]["loader"])
    loader["next"] = max(0, math.ceil((end - rank) / world))
    loader["buckets"] = [[] for _ in loader["buckets"]]
    return normalizers, loader


class ResumeState(HookBase):
    """The per-process state an exact resume needs beyond detectron2's (see the module
    docstring), as this hook's ``state_dict``:

        {"world_size": int, "ranks": [{"rng": dict, "loss_normalizers": {module name:
         float}, "loader": dict or None}, ...one per process]}

    ``collect()`` gathers it (a collective: every process calls it, at the same iteration;
    ``PreemptibleCheckpointer`` does before each checkpoint). ``load_state_dict`` restores
    this process's entry; from a checkpoint of another number of processes it warns that the
    resume is not exact and regroups (``_regroup``). A resumed run (``start_iter > 0``) whose
    checkpoint had no such state gets a warning when training starts."""

    def __init__(self):
        self._state: Optional[dict] = None
        self._restored = False

    def _sampler(self) -> Optional[ResumableBatchSampler]:
        sampler = getattr(self.trainer.data_loader, "batch_sampler", None)
        return sampler if isinstance(sampler, ResumableBatchSampler) else None

    def _dense_detectors(self):
        """The model's DenseDetectors by module name (their EMA ``loss_normalizer`` exists
        after their first training step only)."""
        return {
            name: m
            for name, m in _unwrap(self.trainer.model).named_modules()
            if isinstance(m, DenseDetector)
        }

    def collect(self) -> None:
        """Gathers the state of every process after the current iteration (a collective)."""
        sampler = self._sampler()
        trainer = self.trainer
        local = {
            "rng": _rng_state(),
            "loss_normalizers": {
                name: m.loss_normalizer
                for name, m in self._dense_detectors().items()
                if hasattr(m, "loss_normalizer")
            },
            "loader": sampler.state_after(trainer.iter - trainer.start_iter) if sampler else None,
        }
        self._state = {"world_size": comm.get_world_size(), "ranks": comm.all_gather(local)}

    def state_dict(self) -> dict:
        """The state last collected ({} before any: then nothing is saved)."""
        return self._state or {}

    def load_state_dict(self, state_dict: dict) -> None:
        world, rank = comm.get_world_size(), comm.get_rank()
        if state_dict["world_size"] == world:
            mine = state_dict["ranks"][rank]
            _set_rng_state(mine["rng"])
            normalizers, loader = mine["loss_normalizers"], mine["loader"]
        else:
            logger.warning(
                f"The checkpoint was written by {state_dict['world_size']} processes, this run "
                f"has {world}: the resume is not exact (random generators start afresh, the loss "
                "normalisers are averaged, the data order continues after the last sample any "
                "process used)"
            )
            normalizers, loader = _regroup(state_dict, world, rank)
        modules = self._dense_detectors()
        for name, value in normalizers.items():
            if name in modules:
                modules[name].loss_normalizer = value
        sampler = self._sampler()
        if loader is not None:
            if sampler is None:
                logger.warning(
                    "The checkpoint holds a training loader position but this run's loader is "
                    "not exactly resumable: its data order starts afresh"
                )
            else:
                sampler.load_state_dict(loader)
        self._state = state_dict
        self._restored = True

    def before_train(self):
        if self.trainer.start_iter > 0 and not self._restored:
            logger.warning(
                "The checkpoint has no EAPM resume state (written by detectron2 or an older "
                "version): the data order, random generators and loss normalisers start afresh"
            )


class PreemptibleCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointer, run in every process, that also checkpoints
    and stops on a preemption signal.

    Args:
        checkpointer, period, **kwargs: detectron2's ``PeriodicCheckpointer`` (file names
            ``model_<iteration>.pth`` and ``model_final.pth``, ``max_to_keep``, ...).
        signals: names of the preemption signals (``preemption_signals``; raises its
            ``ValueError``).
        exit_code: the exit status of a preempted run (1..255).
        resume_state: the trainer's ``ResumeState`` hook, collected before every checkpoint
            (None: checkpoints hold detectron2's state only).

    After every iteration the processes agree (one all-reduce of a flag) whether any got
    one of ``signals``; if so, the resume state is gathered, one checkpoint
    ``model_<iteration>.pth`` is written by the main process, all processes wait for it,
    and ``Preempted(exit_code)`` ends the job. Further signals meanwhile only set the
    flag again. After training (also when preempted) the training loader's iterator is
    shut down: its workers ignore the preemption signals, so they cannot be left to the
    interpreter's exit."""

    def __init__(
        self,
        checkpointer,
        period: int,
        signals: Sequence[str] = (),
        exit_code: int = 75,
        resume_state: Optional[ResumeState] = None,
        **kwargs,
    ):
        super().__init__(checkpointer, period, **kwargs)
        self.signals = preemption_signals(signals)
        if not 1 <= int(exit_code) <= 255:
            raise ValueError(f"the preemption exit code must be in [1, 255], got {exit_code}")
        self.exit_code = int(exit_code)
        self.resume_state = resume_state
        self.requested = None  # the signal received, if any
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.requested is None:
            logger.warning(
                f"Received {signal.Signals(signum).name}: checkpointing after this iteration, "
                f"then exiting with status {self.exit_code}"
            )
        self.requested = signum

    def before_train(self):
        super().before_train()
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                logger.warning("Not in the main thread: preemption signals are not handled")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def after_train(self):
        close_train_loader(self.trainer)
        if self.requested is None:  # once preempted, later signals must not kill the exit
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous = {}

    def _agreed_stop(self) -> bool:
        stop = self.requested is not None
        if comm.get_world_size() == 1:
            return stop
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(stop)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def after_step(self):
        it = self.trainer.iter
        stop = self._agreed_stop()
        periodic = (it + 1) % self.period == 0 or it >= self.max_iter - 1
        if not (stop or periodic):
            return
        if self.resume_state is not None:
            self.resume_state.collect()  # every process takes part
        if comm.is_main_process():
            self.step(it)  # detectron2's periodic / final checkpoint
            if stop and not periodic:
                self.checkpointer.save(f"{self.file_prefix}_{it:07d}", iteration=it)
        if stop:
            comm.synchronize()  # nobody exits before the checkpoint is on disk
            logger.warning(
                f"Preempted: checkpoint of iteration {it} written; exiting with status "
                f"{self.exit_code} (rerun with --resume to continue exactly from it)"
            )
            raise Preempted(self.exit_code)
