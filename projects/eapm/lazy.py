"""Training and evaluation of LazyConfig (``.py``) configs: detectron2's LazyConfig training
loop (a ``SimpleTrainer`` / ``AMPTrainer`` with detectron2's hooks, as its
``tools/lazyconfig_train_net.py`` describes) with the engine of the yacs path
(``eapm.engine``): the same hooks (``ResumeState``, ``PreemptibleCheckpointer``), gradient
clipping, DDP and atomic checkpoints, so that a yacs config and its LazyConfig twin are two
spellings of one run.

``train_net.py --config-file X.py`` runs ``main`` here; the flags are those of the yacs path
(``--eval-only``, ``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``,
``--dist-url``, ``--register-coco``), and the overrides are LazyConfig's ``key=value``
(``train.max_iter=100 model.eapm_cls_mu=2.0``).

A LazyConfig holds ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``),
``optimizer``, ``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys), and
keys of this project in ``train``, each the twin of a yacs key (a missing one takes the
yacs key's default):

* ``train.clip_gradients``: ``dict(enabled, clip_type "value"|"norm"|"full_model",
  clip_value, norm_type)``, yacs' ``SOLVER.CLIP_GRADIENTS`` (``eapm.engine.build_optimizer``
  builds the optimizer of either config system);
* ``train.preemption``: ``dict(signals=[...], exit_code=75)``, yacs'
  ``SOLVER.PREEMPTION.SIGNALS`` / ``EXIT_CODE``;
* ``train.seed``: the random seed (< 0: a random one), yacs' ``SEED``;
* ``train.channels_last``: the model in the channels-last memory format, yacs'
  ``MODEL.CHANNELS_LAST`` (``build_model``).

Exact resume needs ``dataloader.train`` to be ``eapm.data.resumable.
build_resumable_train_loader`` (yacs' ``DATALOADER.EXACT_RESUME True``; the configs of this
project use it); with another loader the data order starts afresh on ``--resume``.

On a machine without CUDA ``train.device`` falls back to ``"cpu"`` (several processes then
use GLOO, as on the yacs path). The embedded dataset ``eapm_shapes_*`` is registered at
``$EAPM_DATASETS`` / ``./datasets`` (generated on first use).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig, OmegaConf

from .checkpoint import EAPMCheckpointer
from .config import config_file_chain, default_config, import_modules
from .data import check_category_counts, register_coco_json, register_embedded, require_trainable
from .engine.hooks import PreemptibleCheckpointer, ResumeState, rng_isolated
from .engine.launch import create_ddp_model
from .engine.solver import build_optimizer

__all__ = [
    "load_lazy_config",
    "build_model",
    "build_trainer",
    "do_test",
    "do_train",
    "is_lazy_config",
    "main",
    "preemption_kwargs",
]

logger = logging.getLogger("eapm")


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` names a LazyConfig (a ``.py`` file) rather than a yacs one."""
    return os.path.splitext(path)[1] == ".py"


def load_lazy_config(config_file: str, overrides=()):
    """The LazyConfig of ``config_file`` with the ``key=value`` ``overrides`` applied
    (``LazyConfig.apply_overrides``); ``train.device`` becomes ``"cpu"`` when CUDA is not
    available. Nothing is instantiated (cheap: a bad key fails in seconds)."""
    if not is_lazy_config(config_file):  # a .yaml LazyConfig: LazyConfig.load runs its tags
        config_file_chain(config_file)
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if "train" in cfg and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    return cfg


def preemption_kwargs(cfg) -> Dict[str, Any]:
    """``dict(signals, exit_code)`` of ``train.preemption`` (defaults: yacs'
    SOLVER.PREEMPTION)."""
    default = default_config().SOLVER.PREEMPTION
    p = cfg.train.get("preemption", None) or {}
    return dict(
        signals=list(p.get("signals", default.SIGNALS)),
        exit_code=int(p.get("exit_code", default.EXIT_CODE)),
    )


def _register_datasets(args, cfg) -> None:
    register_embedded(None)
    names = OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None)
    train = {names} if isinstance(names, str) else set(names or ())
    if not OmegaConf.select(cfg, "dataloader.train.dataset.filter_empty", default=True):
        train = set()  # all-background training is allowed, as on the yacs path
    for name, json_file, image_root in getattr(args, "register_coco", None) or ():
        register_coco_json(name, json_file, image_root, check_now=True)  # before the model
        if name in train and not args.eval_only:
            require_trainable(name, json_file, image_root)


def _num_classes(node, path: str) -> Dict[str, int]:
    """The ``num_classes`` values of a LazyConfig's model tree, by their full key (e.g.
    ``model.head.num_classes``): the LazyConfig spelling of ``*.NUM_CLASSES``."""
    found: Dict[str, int] = {}
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False) if hasattr(node, "items_ex") else node.items():
            if k == "num_classes" and isinstance(v, int):
                found[f"{path}.{k}"] = v
            else:
                found.update(_num_classes(v, f"{path}.{k}"))
    return found


def setup(args):
    """Loads the config, sets up logging, the output folder and the seed (detectron2's
    ``default_setup``, as on the yacs path), registers the datasets. Returns the config."""
    import_modules(getattr(args, "imports", None) or ())  # train_net.py --import, in each process
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="eapm")
    _register_datasets(args, cfg)
    names = [OmegaConf.select(cfg, f"dataloader.{s}.dataset.names", default=None)
             for s in ("train", "test")]  # fmt: skip
    names = [n for x in names if x for n in ([x] if isinstance(x, str) else x)]
    check_category_counts(names, _num_classes(cfg.model, "model"))
    return cfg


def _ddp(cfg, model):
    return create_ddp_model(model, **cfg.train.get("ddp", {}))


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
    with rng_isolated():  # periodic evaluation does not change training (engine.hooks)
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def build_trainer(cfg, resume: bool = False):
    """The trainer of ``cfg``, loaded and ready: ``trainer.train(trainer.start_iter,
    cfg.train.max_iter)`` trains. Builds, in the yacs trainer's order, the model, its
    optimizer (``build_optimizer``), the training loader (``dataloader.train``) and the
    DDP wrapper, then detectron2's ``SimpleTrainer`` (``AMPTrainer`` with
    ``train.amp.enabled``) with the hooks of the yacs path: ``IterationTimer``,
    ``LRScheduler`` (``lr_multiplier``), ``ResumeState`` and ``PreemptibleCheckpointer``
    (every ``train.checkpointer.period``; ``train.preemption``), ``EvalHook`` (every
    ``train.eval_period``, 0: at the end) and the writers (every ``train.log_period``).
    ``resume``: continue from the output folder's last checkpoint (falling back past a
    damaged one), else start from ``train.init_checkpoint``."""
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    optim = build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    model = _ddp(cfg, model)
    amp = cfg.train.get("amp", {}).get("enabled", False)
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, train_loader, optim)
    checkpointer = EAPMCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    ckpt = cfg.train.checkpointer
    resume_state = ResumeState()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            resume_state,
            PreemptibleCheckpointer(
                checkpointer,
                ckpt.period,
                resume_state=resume_state,
                max_to_keep=ckpt.get("max_to_keep"),
                **preemption_kwargs(cfg),
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    trainer.start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    return trainer


def do_train(args, cfg) -> None:
    """Trains ``cfg`` (``build_trainer``; ``args.resume``) for ``train.max_iter`` iterations,
    evaluating at the end."""
    trainer = build_trainer(cfg, resume=args.resume)
    trainer.train(trainer.start_iter, cfg.train.max_iter)


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
