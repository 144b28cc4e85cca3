"""Training and evaluation of LazyConfig (``.py``) configs: detectron2's LazyConfig training
loop (a ``SimpleTrainer`` / ``AMPTrainer`` with detectron2's hooks, as its
``tools/lazyconfig_train_net.py`` describes), written for this project.

``train_net.py --config-file X.py`` dispatches here; the flags are those of the yacs path
(``--eval-only``, ``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``,
``--dist-url``, ``--register-coco``), and the overrides are LazyConfig's ``key=value``
(``train.max_iter=100 model.eapm_cls_mu=2.0``).

A LazyConfig holds ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``),
``optimizer``, ``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys), and
three keys of this project in ``train``:

* ``train.clip_gradients``: ``dict(enabled, clip_type "value"|"norm", clip_value,
  norm_type)``, yacs' ``SOLVER.CLIP_GRADIENTS`` (``clip_gradients`` below);
* ``train.seed``: the random seed (< 0: a random one), yacs' ``SEED``;
* ``train.channels_last``: the model in the channels-last memory format, yacs'
  ``MODEL.CHANNELS_LAST`` (``build_model``).

On a machine without CUDA ``train.device`` falls back to ``"cpu"`` (several processes then
use GLOO, as on the yacs path). The embedded dataset ``eapm_shapes_*`` is registered at
``$EAPM_DATASETS`` / ``./datasets`` (generated on first use). Checkpoints are written by
``eapm.checkpoint.EAPMCheckpointer`` (atomic, damaged-file fallback on ``--resume``).
Not on this path (yacs only): exact resume of the data order and of the EMA loss
normalisers, and preemption signals.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import EAPMCheckpointer
from .data import register_coco_json, register_embedded

__all__ = [
    "load_lazy_config",
    "build_model",
    "clip_gradients",
    "do_test",
    "do_train",
    "main",
    "launch_main",
]

logger = logging.getLogger("eapm")

CLIP_TYPES = ("value", "norm")


def load_lazy_config(config_file: str, overrides=()):
    """The LazyConfig of ``config_file`` with the ``key=value`` ``overrides`` applied
    (``LazyConfig.apply_overrides``); ``train.device`` becomes ``"cpu"`` when CUDA is not
    available. Nothing is instantiated (cheap: a bad key fails in seconds)."""
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if "train" in cfg and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    return cfg


def clip_gradients(
    optimizer: torch.optim.Optimizer,
    enabled: bool = True,
    clip_type: str = "norm",
    clip_value: float = 1.0,
    norm_type: float = 2.0,
) -> torch.optim.Optimizer:
    """``optimizer`` (the same object), whose ``step`` first clips the gradients of all its
    parameters: ``clip_type`` "norm" (``torch.nn.utils.clip_grad_norm_`` over all of them,
    ``max_norm=clip_value``, ``norm_type``) or "value" (``clip_grad_value_``). The meaning
    of yacs' ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE`` "norm" / "value" ("full_model"
    clipping, as the configs of this project use it). ``enabled=False`` returns it unchanged.

    Raises ``ValueError`` for an unknown ``clip_type`` or a ``clip_value`` <= 0."""
    if not enabled:
        return optimizer
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"clip_type must be one of {CLIP_TYPES}, got {clip_type!r}")
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value!r}")
    base = type(optimizer)

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if clip_type == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        return base.step(self, closure)

    # a subclass per instance: the optimizer's class (and its state_dict) stay the base's
    optimizer.__class__ = type(f"{base.__name__}WithGradientClipping", (base,), {"step": step})
    return optimizer


def _register_datasets(args) -> None:
    register_embedded(None)
    for name, json_file, image_root in getattr(args, "register_coco", None) or ():
        register_coco_json(name, json_file, image_root)


def setup(args):
    """Loads the config, sets up logging, the output folder and the seed (detectron2's
    ``default_setup``), registers the datasets. Returns the config."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="eapm")
    _register_datasets(args)
    return cfg


def _ddp(cfg, model):
    kwargs = dict(cfg.train.get("ddp", {}))
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None  # DDP rejects device_ids for CPU modules
    return create_ddp_model(model, **kwargs)


def build_model(cfg) -> torch.nn.Module:
    """``cfg.model`` instantiated on ``train.device``, in the channels-last memory format
    with ``train.channels_last`` (yacs' ``MODEL.CHANNELS_LAST``; default False)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    if cfg.train.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


def do_test(cfg, model) -> Dict[str, Any]:
    """COCO evaluation (``dataloader.test`` + ``dataloader.evaluator``); prints detectron2's
    ``copypaste:`` lines and returns the results ({} without an evaluator)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def do_train(args, cfg) -> None:
    """Trains ``cfg.model`` with ``cfg.optimizer`` (+ ``train.clip_gradients``),
    ``cfg.lr_multiplier`` and ``cfg.dataloader.train`` for ``train.max_iter`` iterations,
    checkpointing every ``train.checkpointer.period``, evaluating every
    ``train.eval_period`` (0: at the end only) and at the end."""
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    clip = cfg.train.get("clip_gradients", None)
    if clip:
        optim = clip_gradients(optim, **clip)
    train_loader = instantiate(cfg.dataloader.train)
    model = _ddp(cfg, model)
    amp = cfg.train.get("amp", {}).get("enabled", False)
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, train_loader, optim)
    checkpointer = EAPMCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    ckpt = cfg.train.checkpointer
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(
                    checkpointer, ckpt.period, max_to_keep=ckpt.get("max_to_keep")
                )
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args) -> Optional[Dict[str, Any]]:
    """One process of ``train_net.py`` with a LazyConfig: evaluation (``--eval-only``:
    ``train.init_checkpoint``, or with ``--resume`` the output folder's last checkpoint)
    or training."""
    cfg = setup(args)
    if args.eval_only:
        model = _ddp(cfg, build_model(cfg))
        EAPMCheckpointer(model, cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, model)
    do_train(args, cfg)
    return None


def launch_main(args) -> None:
    """``main`` in ``--num-gpus x --num-machines`` processes (detectron2's ``launch``),
    after loading the config once here, so that a bad key or value fails before any
    process is spawned."""
    from .engine import launch_from_args

    load_lazy_config(args.config_file, args.opts)
    launch_from_args(main, args)


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` names a LazyConfig (a ``.py`` file) rather than a yacs one."""
    return os.path.splitext(path)[1] == ".py"
