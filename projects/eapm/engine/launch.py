"""Processes: the launch of ``train_net.py``'s workers, the launcher's half of preemption,
and the one way both config systems wrap a model in DistributedDataParallel."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import torch
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model

from .hooks import Preempted

__all__ = ["create_ddp_model", "launch_from_args", "preemption_exit"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's ``create_ddp_model`` (the model itself with one process, else
    DistributedDataParallel with ``kwargs``), with ``device_ids=None`` for a model whose
    parameters are on the CPU: DistributedDataParallel rejects ``device_ids`` for CPU
    modules, and detectron2 passes ``[local_rank]`` unless told otherwise."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


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
    while active, the preemption ``signals`` (names) it receives are passed on to its worker
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
