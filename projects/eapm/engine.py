"""The project's trainer: detectron2's DefaultTrainer with COCO evaluation, the
dataset registration of this project, and multi-process training on CPUs."""

from __future__ import annotations

import contextlib
import os

import torch
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .data import register_from_config

__all__ = ["EAPMTrainer", "cpu_ddp"]


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


class EAPMTrainer(DefaultTrainer):
    """DefaultTrainer + COCO evaluation + this project's datasets.

    ``cfg`` is expected to come from ``eapm.load_config`` (which validates it); a config
    assembled by hand should be passed through ``eapm.validate_config`` first."""

    def __init__(self, cfg):
        register_from_config(cfg)
        with cpu_ddp(cfg.MODEL.DEVICE == "cpu"):
            super().__init__(cfg)

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
