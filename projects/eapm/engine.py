"""The project's trainer: detectron2's DefaultTrainer with COCO evaluation, the
dataset registration of this project, multi-process training on CPUs, and preemption-safe,
exactly resumable training:

* every checkpoint also holds what decides the next step beyond detectron2's model,
  optimizer, scheduler and iteration: the dense heads' EMA loss normalisers, the random
  number generator states of every process, and the training loader's position
  (``eapm.data.resumable``); ``--resume`` restores them;
* on a preemption signal (SOLVER.PREEMPTION.SIGNALS) every process finishes its iteration,
  the processes agree on the last one, one checkpoint is written at it, and the job exits
  with SOLVER.PREEMPTION.EXIT_CODE;
* checkpoint files are written atomically, and a damaged last checkpoint is skipped with a
  warning (``eapm.checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import weakref

import numpy as np
import torch
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.engine import hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from .checkpoint import EAPMCheckpointer
from .data import register_from_config
from .data.resumable import ResumableBatchSampler, build_resumable_train_loader

__all__ = [
    "EAPMTrainer",
    "PreemptibleCheckpointer",
    "Preempted",
    "cpu_ddp",
    "launch_from_args",
    "preemption_exit",
]

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised (a SystemExit with the configured exit status) after the checkpoint of a
    preempted run is written."""


@contextlib.contextmanager
def cpu_ddp(enabled: bool):
    """While active (and only if ``enabled``), detectron2's ``create_ddp_model`` wraps
    models with ``device_ids=None``: DistributedDataParallel rejects ``device_ids`` for
    CPU modules, and detectron2 always passes ``[local_rank]``. Used for the duration
    of ``DefaultTrainer.__init__`` only, and only for MODEL.DEVICE == "cpu", so GPU runs
    never see it."""
    if not enabled:
        yield
        return
    original = _d2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    _d2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = original


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PreemptibleCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointer, run in every process, that also checkpoints
    and stops on a preemption signal.

    After every iteration the processes agree (one all-reduce of a flag) whether any got
    one of ``signals``; if so, the trainer's resume state is gathered, one checkpoint
    ``model_<iteration>.pth`` is written by the main process, all processes wait for it,
    and ``Preempted(exit_code)`` ends the job. Further signals meanwhile only set the
    flag again. Periodic and final checkpoints are detectron2's (same names and period).
    """

    def __init__(self, checkpointer, period: int, signals=(), exit_code: int = 75, **kwargs):
        super().__init__(checkpointer, period, **kwargs)
        self.signals = [getattr(signal, name) for name in signals]
        self.exit_code = int(exit_code)
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
        # the loader's workers ignore the preemption signals, so they cannot be left to the
        # interpreter's exit (which stops them with SIGTERM): stop them now, on every exit
        self.trainer.close_train_loader()
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
        self.trainer.collect_resume_state()  # every process takes part
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


def launch_from_args(main, args) -> None:
    """detectron2's ``launch`` of ``main(args)`` in ``args.num_gpus`` x ``args.num_machines``
    processes (``args``: train_net.py's parsed command line)."""
    from detectron2.engine import launch

    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


@contextlib.contextmanager
def preemption_exit(signals, exit_code: int):
    """For the launching process of a multi-process job (``launch`` spawns the workers):
    while active, the preemption ``signals`` it receives are passed on to its worker
    processes (which checkpoint and exit with ``exit_code``), and a worker's exit with
    ``exit_code`` becomes this process's exit with ``exit_code`` instead of a traceback."""
    import multiprocessing

    from torch.multiprocessing import ProcessExitedException

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(getattr(signal, s), forward) for s in signals}
    try:
        yield
    except ProcessExitedException as e:
        if e.exit_code != exit_code:
            raise
        logger.warning(f"A worker process was preempted: exiting with status {exit_code}")
        raise Preempted(exit_code) from None
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class EAPMTrainer(DefaultTrainer):
    """DefaultTrainer + COCO evaluation + this project's datasets + preemption-safe,
    exactly resumable training (see the module docstring).

    ``cfg`` is expected to come from ``eapm.load_config`` (which validates it); a config
    assembled by hand should be passed through ``eapm.validate_config`` first."""

    def __init__(self, cfg):
        register_from_config(cfg)
        self._resume_state = None
        with cpu_ddp(cfg.MODEL.DEVICE == "cpu"):
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model of ``cfg``, in the channels-last memory format with
        MODEL.CHANNELS_LAST."""
        model = super().build_model(cfg)
        if cfg.MODEL.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        """The exactly resumable loader (DATALOADER.EXACT_RESUME True), else detectron2's."""
        if cfg.DATALOADER.EXACT_RESUME:
            return build_resumable_train_loader(cfg)
        return super().build_train_loader(cfg)

    def build_hooks(self):
        """detectron2's hooks, with its main-process PeriodicCheckpointer replaced by a
        ``PreemptibleCheckpointer`` in every process (at the same place: before
        evaluation), writing through an ``EAPMCheckpointer``."""
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this
        self.checkpointer = EAPMCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]
        p = self.cfg.SOLVER.PREEMPTION
        checkpointer = PreemptibleCheckpointer(
            self.checkpointer,
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
            signals=p.SIGNALS,
            exit_code=p.EXIT_CODE,
        )
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
        ret.insert(at, checkpointer)
        return ret

    def close_train_loader(self) -> None:
        """Shuts the training loader's iterator (and its worker processes) down now; a
        later iteration would start a new one."""
        loader = self._trainer.data_loader
        self._trainer.reset_data_loader(lambda: loader)  # drops the iterator: workers stop

    # ------------------------------------------------------------- resume state
    def _train_sampler(self):
        sampler = getattr(self._trainer.data_loader, "batch_sampler", None)
        return sampler if isinstance(sampler, ResumableBatchSampler) else None

    def collect_resume_state(self) -> None:
        """Gathers (a collective: every process calls it) what decides the next iteration
        beyond detectron2's state, per process: random generators, EMA loss normalisers,
        the training loader's position. ``state_dict`` saves the last one gathered."""
        sampler = self._train_sampler()
        local = {
            "rng": _rng_state(),
            "loss_normalizers": {
                name: m.loss_normalizer
                for name, m in _unwrap(self.model).named_modules()
                if isinstance(m, DenseDetector) and hasattr(m, "loss_normalizer")
            },
            "loader": sampler.state_after(self.iter - self.start_iter) if sampler else None,
        }
        ranks = comm.all_gather(local)
        self._resume_state = {"world_size": comm.get_world_size(), "ranks": ranks}

    def state_dict(self):
        ret = super().state_dict()
        if self._resume_state is not None:
            ret["eapm_resume"] = self._resume_state
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict.get("eapm_resume")
        if saved is None:
            logger.warning(
                "The checkpoint has no EAPM resume state (written by detectron2 or an older "
                "version): the data order, random generators and loss normalisers start afresh"
            )
            return
        world, rank = comm.get_world_size(), comm.get_rank()
        if saved["world_size"] == world:
            mine = saved["ranks"][rank]
            _set_rng_state(mine["rng"])
            normalizers, loader = mine["loss_normalizers"], mine["loader"]
        else:
            logger.warning(
                f"The checkpoint was written by {saved['world_size']} processes, this run has "
                f"{world}: the resume is not exact (random generators start afresh, the loss "
                "normalisers are averaged, the data order continues after the last sample any "
                "process used)"
            )
            normalizers, loader = _regroup(saved, world, rank)
        modules = dict(_unwrap(self.model).named_modules())
        for name, value in normalizers.items():
            if name in modules:
                modules[name].loss_normalizer = value
        sampler = self._train_sampler()
        if sampler is not None and loader is not None:
            sampler.load_state_dict(loader)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW with SOLVER.OPTIMIZER "ADAMW" (same parameter
        groups, weight decay and gradient clipping)."""
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer = torch.optim.AdamW(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        register_from_config(cfg)
        return super().test(cfg, model, evaluators)


def _regroup(saved: dict, world: int, rank: int):
    """(loss normalisers, loader state) of process ``rank`` of ``world`` from a resume
    state written by another number of processes: the normalisers' mean, and the position
    after the furthest stream element any saved process had taken (buckets dropped)."""
    ranks = saved["ranks"]
    normalizers = {}
    for name in set().union(*(r["loss_normalizers"] for r in ranks)):
        values = [r["loss_normalizers"][name] for r in ranks if name in r["loss_normalizers"]]
        normalizers[name] = float(np.mean(values))
    if any(r["loader"] is None for r in ranks):
        return normalizers, None
    end = max(i + r["loader"]["next"] * saved["world_size"] for i, r in enumerate(ranks))
    loader = dict(ranks[0]["loader"])
    loader["next"] = max(0, math.ceil((end - rank) / world))
    loader["buckets"] = [[] for _ in loader["buckets"]]
    return normalizers, loader
