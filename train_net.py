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


def setup(args):
    cfg = get_cfg()
    eapm.add_eapm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        cfg.MODEL.DEVICE = "cpu"
    eapm.validate_eapm_config(cfg)  # fail in seconds, before any data or model work
    for name, json_file, image_root in args.register_coco or []:
        cfg.DATASETS.COCO_JSON.append([name, json_file, image_root])
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
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
