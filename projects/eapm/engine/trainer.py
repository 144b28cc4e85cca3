"""The trainer of yacs configs: detectron2's DefaultTrainer with this project's datasets,
model options, optimizer (``eapm.engine.solver``), exactly resumable loader, COCO
evaluation, and the hooks of ``eapm.engine.hooks`` (which the LazyConfig loop registers
too)."""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Dict, Optional

import torch
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.engine import hooks
from detectron2.evaluation import COCOEvaluator

from ..checkpoint import EAPMCheckpointer
from ..data import register_from_config
from ..data.resumable import build_resumable_train_loader
from .hooks import PreemptibleCheckpointer, ResumeState, close_train_loader, rng_isolated
from .launch import create_ddp_model
from .solver import build_optimizer

# the dense heads' norm keys: "BN" there needs 2 images per process (1x1 top level)
_HEAD_NORMS = ("MODEL.RETINANET.NORM", "MODEL.FCOS.HEAD_NORM")

__all__ = ["EAPMTrainer"]


@contextlib.contextmanager
def _our_ddp():
    """``DefaultTrainer.__init__`` wraps the model with the ``create_ddp_model`` of
    detectron2's ``engine/defaults.py``, which offers no other hook: while active, that name
    is ``eapm.engine.launch.create_ddp_model`` (the LazyConfig loop calls it directly)."""
    original = _d2_defaults.create_ddp_model
    _d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = original


class EAPMTrainer(DefaultTrainer):
    """DefaultTrainer + COCO evaluation + this project's datasets + preemption-safe,
    exactly resumable training (``ResumeState`` and ``PreemptibleCheckpointer`` hooks,
    atomic checkpoints with a damaged-file fallback: ``eapm.checkpoint``).

    ``cfg`` is expected to come from ``eapm.load_config`` (which validates it); a config
    assembled by hand should be passed through ``eapm.validate_config`` first."""

    def __init__(self, cfg):
        register_from_config(cfg)
        with _our_ddp():
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
    def build_optimizer(cls, cfg, model):
        """``eapm.engine.solver.build_optimizer``: SGD or AdamW, SOLVER.CLIP_GRADIENTS."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """The exactly resumable loader (DATALOADER.EXACT_RESUME True), else detectron2's."""
        if cfg.DATALOADER.EXACT_RESUME:
            return build_resumable_train_loader(cfg)
        return super().build_train_loader(cfg)

    def build_hooks(self):
        """detectron2's hooks, with its main-process PeriodicCheckpointer replaced by a
        ``ResumeState`` and a ``PreemptibleCheckpointer`` in every process (at the same
        place: before evaluation), writing through an ``EAPMCheckpointer``."""
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this
        self.checkpointer = EAPMCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]
        p = self.cfg.SOLVER.PREEMPTION
        resume_state = ResumeState()
        checkpointer = PreemptibleCheckpointer(
            self.checkpointer,
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
            signals=p.SIGNALS,
            exit_code=p.EXIT_CODE,
            resume_state=resume_state,
        )
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
        ret[at:at] = [resume_state, checkpointer]
        return ret

    def close_train_loader(self) -> None:
        """Shuts the training loader's iterator (and its worker processes) down now; a
        later iteration would start a new one (``eapm.engine.hooks.close_train_loader``)."""
        close_train_loader(self)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation, leaving the random generators as it found them
        (``eapm.engine.hooks.rng_isolated``): periodic evaluation does not change training."""
        register_from_config(cfg)
        with rng_isolated():
            return super().test(cfg, model, evaluators)


def check_training_config(cfg, world_size: Optional[int], reads: Dict[str, Any]) -> None:
    """The keys only a training job uses: SOLVER.AMP.ENABLED needs CUDA; SOLVER.IMS_PER_BATCH
    (all processes together, when SOLVER.REFERENCE_WORLD_SIZE is 0) must divide among the
    ``world_size`` processes and give a head with BatchNorm (``reads``: the keys the model
    read, ``eapm.validation.keys_read_by_model``) 2 images per process. Raises ``ValueError``
    naming the key."""
    from ..config import invalid

    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        raise invalid(
            "SOLVER.AMP.ENABLED",
            True,
            "mixed-precision training (detectron2's AMPTrainer) needs CUDA, and MODEL.DEVICE "
            "is 'cpu' (set when no GPU is available)",
        )
    if world_size is None or cfg.SOLVER.REFERENCE_WORLD_SIZE != 0:
        return
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % world_size:  # detectron2 asserts this only after model and data are loaded
        raise invalid(
            "SOLVER.IMS_PER_BATCH",
            batch,
            "it is the total batch of all processes and must be divisible by their number "
            f"({world_size} = --num-gpus x --num-machines)",
        )
    per_process = batch // world_size
    for key in _HEAD_NORMS:  # BatchNorm on one image's 1x1 top level fails at iteration 0
        if reads.get(key) == "BN" and per_process < 2:
            raise invalid(
                "SOLVER.IMS_PER_BATCH",
                batch,
                f"the head's BatchNorm needs at least 2 images per process, got {per_process} "
                f"({world_size} processes, {key} 'BN'); use more images, or GN / SyncBN in the "
                "head",
            )
