#!/usr/bin/env python
"""Draw a trained detector's predictions with detectron2's Visualizer.

    python tools/visualize.py --config-file configs/quickstart/eapm_retinanet.yaml \\
        --weights output/quickstart/eapm_retinanet/model_final.pth \\
        --input eapm_shapes_val --num 16 --show-gt --output output/vis
    python tools/visualize.py --config-file X.yaml --weights W.pth --input img.jpg --output vis/
    python tools/visualize.py --config-file X.yaml --weights W.pth --input images/ --output vis/
    python tools/visualize.py --config-file configs/quickstart/eapm_retinanet.py \\
        --weights output/quickstart/eapm_retinanet_lazy/model_final.pth --input eapm_shapes_val \\
        --output output/vis

--config-file is a yacs (.yaml) or LazyConfig (.py) config (--opts KEY VALUE ... or
key=value ...). The model runs on the GPU when there is one, else on the CPU, with the
weights loaded as data (eapm.checkpoint.EAPMCheckpointer). demo/demo.py draws images at
their own size under their own names, with detectron2's demo flags; this tool also draws
registered datasets with their ground truth, scaled up.

--input is an image file, a folder of images, or the name of a registered dataset
(the embedded eapm_shapes_train / eapm_shapes_val, COCO's builtin names, or anything
registered through DATASETS.COCO_JSON in the config / --opts); for a dataset the first
--num images are drawn, with --show-gt next to their ground truth. One PNG per image
goes to --output. Detections scored below --score-thresh are dropped (it also sets the
models' test-time thresholds: eapm.predictor.set_score_threshold).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode

import eapm  # noqa: F401  (registers the project's models)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(args):
    """The config of ``--config-file`` (yacs or LazyConfig, ``eapm.model_zoo.get_config``)
    with ``--opts``, the weights of ``--weights`` and the score threshold
    (``eapm.predictor.set_score_threshold``); the project's datasets registered."""
    from eapm.data import register_embedded, register_from_config
    from eapm.model_zoo import get_config, resolve_config_file
    from eapm.predictor import set_score_threshold

    cfg = get_config(resolve_config_file(args.config_file), list(args.opts))
    if isinstance(cfg, CfgNode):
        cfg.MODEL.WEIGHTS = args.weights
        register_from_config(cfg)
    else:
        cfg.train.init_checkpoint = args.weights
        register_embedded(None)
    set_score_threshold(cfg, args.score_thresh)
    return cfg


def list_inputs(spec: str, num: Optional[int]) -> Tuple[List[Dict], Optional[str]]:
    """[{"file_name", optionally the dataset dict}], and the dataset name (or None)."""
    if os.path.isfile(spec):
        return [{"file_name": spec}], None
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise SystemExit(f"--input {spec}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
        return [{"file_name": os.path.join(spec, f)} for f in files[:num]], None
    from detectron2.data import DatasetCatalog

    if spec in DatasetCatalog.list():
        dicts = DatasetCatalog.get(spec)
        return list(dicts[: num if num is not None else 16]), spec
    raise SystemExit(
        f"--input {spec!r} is neither an image, a folder nor a registered dataset "
        "(register one with --opts DATASETS.COCO_JSON \"[['name', 'ann.json', 'images/']]\")"
    )


def _out_name(file_name: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(file_name))[0] or "image"
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name + ".png"


def visualize(cfg, inputs: Sequence[Dict], dataset: Optional[str], output: str, score_thresh: float,
              show_gt: bool = False, scale: Optional[float] = None) -> List[str]:  # fmt: skip
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    from eapm.predictor import EAPMPredictor

    predictor = EAPMPredictor(cfg)
    metadata = MetadataCatalog.get(dataset) if dataset else predictor.metadata
    os.makedirs(output, exist_ok=True)
    written, used = [], set()
    for d in inputs:
        bgr = read_image(d["file_name"], format="BGR")
        rgb = bgr[:, :, ::-1]
        s = scale if scale else max(1.0, 512.0 / max(rgb.shape[:2]))
        inst = predictor(bgr)["instances"].to("cpu")
        inst = inst[inst.scores >= score_thresh]
        panels = [Visualizer(rgb, metadata, scale=s).draw_instance_predictions(inst).get_image()]
        if show_gt and "annotations" in d:
            panels.append(Visualizer(rgb, metadata, scale=s).draw_dataset_dict(d).get_image())
        if len(panels) > 1:
            gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
            image = np.concatenate([panels[0], gap, panels[1]], axis=1)
        else:
            image = panels[0]
        path = os.path.join(output, _out_name(d["file_name"], used))
        Image.fromarray(image).save(path)
        written.append(path)
        print(f"{path}: {len(inst)} detections >= {score_thresh:g}")
    return written


def build_parser():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config-file", required=True, metavar="FILE")
    ap.add_argument(
        "--weights",
        required=True,
        help="checkpoint (.pth / .pkl / detectron2:// URL): MODEL.WEIGHTS of a yacs config, "
        "train.init_checkpoint of a LazyConfig",
    )
    ap.add_argument(
        "--input", required=True, help="image file, image folder or registered dataset name"
    )
    ap.add_argument("--output", required=True, help="output folder for the PNGs")
    ap.add_argument(
        "--score-thresh", type=float, default=0.3, help="minimum detection score (default 0.3)"
    )
    ap.add_argument(
        "--num",
        type=int,
        default=None,
        help="at most this many images (default: 16 of a dataset, all files)",
    )
    ap.add_argument(
        "--show-gt",
        action="store_true",
        help="dataset input: draw the ground truth next to the predictions",
    )
    ap.add_argument(
        "--scale", type=float, default=None, help="drawing scale (default: longer side >= 512 px)"
    )
    ap.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE ... (yacs) or key=value ... (LazyConfig)",
    )
    return ap


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    from detectron2.utils.logger import setup_logger

    args = build_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    try:
        cfg = setup_cfg(args)
        inputs, dataset = list_inputs(args.input, args.num)
        return visualize(
            cfg, inputs, dataset, args.output, args.score_thresh, args.show_gt, args.scale
        )
    except (FileNotFoundError, ValueError) as e:  # a missing file, a bad value: one line
        raise SystemExit(f"visualize.py: error: {e}") from None


if __name__ == "__main__":
    main()
