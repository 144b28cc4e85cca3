#!/usr/bin/env python
"""Train / evaluate EAPM detectors with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/quickstart/eapm_retinanet.yaml
    python train_net.py --config-file configs/COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml \
        --num-gpus 8
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS output/model_final.pth

Multi-node: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT.
Without GPUs the model runs on the CPU (MODEL.DEVICE is set to "cpu") and several
processes use GLOO.
"""
from __future__ import annotations

import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch

import eapm
from eapm.data import register_from_config
from eapm.engine import EAPMTrainer

logger = logging.getLogger("eapm")


def load_config(args):
    """The merged and validated (not yet frozen) config of the command line. Cheap (no
    data, model or process group), so a bad value fails in seconds with an error naming
    the key; ``__main__`` calls it before ``launch`` spawns any process."""
    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    for name, json_file, image_root in args.register_coco or []:
        cfg.DATASETS.COCO_JSON.append([name, json_file, image_root])
    if args.eval_only:
        eapm.validate_eapm_config(cfg)
        return cfg
    eapm.validate_train_config(cfg)  # + the architecture uses what is switched on, AMP needs CUDA
    world = args.num_gpus * args.num_machines
    if cfg.SOLVER.REFERENCE_WORLD_SIZE == 0 and cfg.SOLVER.IMS_PER_BATCH % world != 0:
        # detectron2 asserts this only after the model and the dataset are loaded
        raise ValueError(
            f"Invalid config SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}: it is the total batch of all "
            f"processes and must be divisible by their number ({world} = --num-gpus x --num-machines)"
        )
    per_process = cfg.SOLVER.IMS_PER_BATCH // world
    head_norm = {"EAPMRetinaNet": cfg.MODEL.RETINANET.NORM, "EAPMFCOS": cfg.MODEL.FCOS.HEAD_NORM}.get(
        cfg.MODEL.META_ARCHITECTURE, ""
    )
    if head_norm == "BN" and per_process < 2 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 0:
        # BatchNorm on the 1x1 top level of one image fails deep inside torch at iteration 0
        raise ValueError(
            f"Invalid config SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}: the head's BatchNorm needs at "
            f"least 2 images per process, got {per_process} ({world} processes); use more images, or "
            "GN / SyncBN in the head"
        )
    return cfg


def setup(args):
    cfg = load_config(args)  # fail in seconds, before any data or model work
    cfg.freeze()
    default_setup(cfg, args)
    register_from_config(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = EAPMTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return EAPMTrainer.test(cfg, model)
    trainer = EAPMTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-json dataset under NAME (repeatable); then use it in DATASETS.TRAIN/TEST",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    load_config(args)  # validate here too: a bad config fails before any process is spawned
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
