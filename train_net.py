#!/usr/bin/env python
"""Train / evaluate EAPM detectors with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/quickstart/eapm_retinanet.yaml
    python train_net.py --config-file configs/COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml \
        --num-gpus 8
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/quickstart/eapm_retinanet.py train.max_iter=100
    python train_net.py --import my_project.modeling --config-file my_config.yaml  # your module

A ``.py`` config file is a LazyConfig, trained by ``eapm.lazy`` with the same engine (same flags;
overrides as key=value, e.g. train.init_checkpoint=output/model_final.pth with --eval-only).

Multi-node: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT.
Preemption: on SIGTERM / SIGUSR1 (SOLVER.PREEMPTION.SIGNALS, LazyConfig train.preemption)
training checkpoints after the current iteration and exits with status 75
(SOLVER.PREEMPTION.EXIT_CODE); rerun the same command with --resume to continue exactly where
it stopped.
Without GPUs the model runs on the CPU (MODEL.DEVICE is set to "cpu") and several
processes use GLOO.
"""
from __future__ import annotations

import logging

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import eapm
from eapm import lazy
from eapm.checkpoint import EAPMCheckpointer
from eapm.config import import_modules
from eapm.data import register_from_config
from eapm.engine import EAPMTrainer, launch_from_args, preemption_exit
from eapm.lazy import is_lazy_config
from eapm.validation import check_datasets_fit_model

logger = logging.getLogger("eapm")


def load_config(args):
    """The merged and validated (not yet frozen) config of the command line
    (``eapm.load_config``). Cheap (no data, model or process group), so a bad value
    fails in seconds with an error naming the key; ``__main__`` calls it before
    ``launch`` spawns any process."""
    return eapm.load_config(
        args.config_file,
        args.opts,
        training=not args.eval_only,
        world_size=args.num_gpus * args.num_machines,
        coco_json=args.register_coco or (),
        imports=args.imports or (),
    )


def setup(args):
    cfg = load_config(args)  # fail in seconds, before any data or model work
    cfg.freeze()
    default_setup(cfg, args)
    # the project's messages (preemption, damaged checkpoints, ...) in log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="eapm")
    register_from_config(cfg)
    check_datasets_fit_model(cfg)  # before the model is built
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = EAPMTrainer.build_model(cfg)
        EAPMCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return EAPMTrainer.test(cfg, model)
    trainer = EAPMTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help=(
            "import MODULE first (repeatable; in every process): it registers your own models, "
            "losses or datasets, and its add_config(cfg), if any, adds your config keys "
            "before the config file is merged"
        ),
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help=(
            "register a COCO-json dataset under NAME (repeatable); "
            "then use it in DATASETS.TRAIN/TEST"
        ),
    )
    return parser


def launch(args) -> None:
    """Loads the config of ``args`` once here, so that a bad key or value fails in seconds
    before any process is spawned, then runs the yacs ``main`` or the LazyConfig loop's
    (``eapm.lazy.main``) in every process, with the launcher's half of preemption around
    both (``preemption_exit``: SOLVER.PREEMPTION / ``train.preemption``)."""
    if is_lazy_config(args.config_file):  # a LazyConfig: detectron2's LazyConfig training loop
        import_modules(args.imports or ())
        cfg = lazy.load_lazy_config(args.config_file, args.opts)
        entry, preemption = lazy.main, lazy.preemption_kwargs(cfg)
    else:
        p = load_config(args).SOLVER.PREEMPTION
        entry, preemption = main, dict(signals=p.SIGNALS, exit_code=p.EXIT_CODE)
    with preemption_exit(**preemption):
        launch_from_args(entry, args)


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    launch(args)
