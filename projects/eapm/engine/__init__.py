"""The training engine of both config systems: a yacs config and its LazyConfig twin are two
spellings of one run.

* ``hooks``: ``ResumeState`` (exact resume: random generators, EMA loss normalisers,
  loader position) and ``PreemptibleCheckpointer`` (preemption signals agreed across
  processes, one checkpoint, exit with the configured status), for any detectron2 trainer;
* ``solver``: the optimizer (``build_optimizer``) and the one gradient clipping
  (``clip_gradients``: "value", "norm", "full_model") of both config systems;
* ``launch``: the workers' launch, the launcher's half of preemption (``preemption_exit``)
  and ``create_ddp_model`` (DistributedDataParallel, also of CPU models);
* ``trainer``: ``EAPMTrainer``, detectron2's DefaultTrainer for yacs configs.

The LazyConfig loop (``eapm.lazy``, above the engine) registers the same hooks, builds the
same clipping and the same DDP, and its configs use the same loader
(``eapm.data.resumable``); checkpoints are written by ``eapm.checkpoint.EAPMCheckpointer``
on both paths.
"""

from .hooks import Preempted, PreemptibleCheckpointer, ResumeState, preemption_signals
from .launch import create_ddp_model, launch_from_args, preemption_exit
from .solver import CLIP_TYPES, build_optimizer, clip_gradients, clip_kwargs
from .trainer import EAPMTrainer

__all__ = [
    "CLIP_TYPES",
    "EAPMTrainer",
    "Preempted",
    "PreemptibleCheckpointer",
    "ResumeState",
    "build_optimizer",
    "clip_gradients",
    "clip_kwargs",
    "create_ddp_model",
    "launch_from_args",
    "preemption_exit",
    "preemption_signals",
]
