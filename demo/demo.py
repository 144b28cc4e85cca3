#!/usr/bin/env python
"""Draw what a trained EAPM detector finds in images, as detectron2's demo/demo.py does.

    python demo/demo.py --config-file configs/quickstart/eapm_retinanet.yaml \\
        --input "datasets/eapm_shapes/val/*.png" --output output/demo \\
        --opts MODEL.WEIGHTS output/quickstart/eapm_retinanet/model_final.pth
    python demo/demo.py --config-file configs/quickstart/eapm_retinanet.py \\
        --input a.jpg b.jpg --output vis/ --confidence-threshold 0.3 \\
        --opts train.init_checkpoint=output/quickstart/eapm_retinanet_lazy/model_final.pth

--config-file: a yacs (.yaml) or LazyConfig (.py) config, a path or a name of
eapm.model_zoo (e.g. quickstart/eapm_retinanet.yaml). --input: image files or glob patterns
(quote them), several allowed. --output: the folder that receives each image, under its own
file name, with the detections scored at least --confidence-threshold (default 0.5) drawn by
detectron2's Visualizer: box, class name, score. --opts: config overrides, KEY VALUE pairs for
a yacs config, key=value for a LazyConfig; the weights are MODEL.WEIGHTS /
train.init_checkpoint, loaded as data (eapm.checkpoint.EAPMCheckpointer). Runs on the GPU
when there is one, else on the CPU. Prints one line per image: its path, the number of
detections drawn, and the seconds the model took.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings
from typing import List, Optional, Sequence

import eapm  # noqa: F401  (registers the project's models)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config-file", required=True, metavar="FILE", help="yacs or LazyConfig file")
    ap.add_argument(
        "--input", nargs="+", required=True, help="image files or glob patterns ('dir/*.png')"
    )
    ap.add_argument("--output", required=True, help="folder for the drawn images")
    ap.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the detections drawn (default 0.5)",
    )
    ap.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE ... (yacs) or key=value ... (LazyConfig)",
    )
    return ap


def input_files(patterns: Sequence[str]) -> List[str]:
    """The files ``patterns`` name (each a path or a glob pattern; sorted per pattern, each
    file once).

    Raises ``FileNotFoundError`` when nothing matches, ``ValueError`` when two files share a
    file name (their outputs would overwrite each other)."""
    files: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matched = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
        files += [f for f in matched if os.path.isfile(f) and f not in files]
    if not files:
        raise FileNotFoundError(f"--input: no file matches {' '.join(map(repr, patterns))}")
    seen = {}
    for f in files:
        name = os.path.basename(f)
        if name in seen:
            raise ValueError(
                f"--input: {seen[name]} and {f} have the same file name: their outputs would "
                "overwrite each other in --output"
            )
        seen[name] = f
    return files


def load_predictor(config_file: str, opts: Sequence[str], threshold: float):
    """The ``eapm.predictor.EAPMPredictor`` of the config, with its score threshold set."""
    from eapm.model_zoo import get_config, resolve_config_file
    from eapm.predictor import EAPMPredictor, set_score_threshold

    cfg = get_config(resolve_config_file(config_file), list(opts))
    set_score_threshold(cfg, threshold)
    return EAPMPredictor(cfg)


def draw(predictor, path: str, output: str, threshold: float):
    """Runs the model on the image ``path``, writes the drawing to ``output`` under the same
    file name; returns (output file, number of detections, seconds of the model)."""
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    try:
        image = read_image(path, format="BGR")
    except Exception as e:  # PIL's errors for a file that is no image
        raise ValueError(f"cannot read the image {path}: {type(e).__name__}: {e}") from None
    start = time.perf_counter()
    instances = predictor(image)["instances"].to("cpu")
    seconds = time.perf_counter() - start
    instances = instances[instances.scores >= threshold]
    drawn = Visualizer(image[:, :, ::-1], predictor.metadata, scale=1.0)
    picture = drawn.draw_instance_predictions(instances).get_image()
    out = os.path.join(output, os.path.basename(path))
    Image.fromarray(picture).save(out)
    return out, len(instances), seconds


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """The command line; returns the files written. Exits with status 2 and a one-line
    message for a missing config, input or weights file, an output folder that holds an
    input, or an invalid value."""
    from eapm.checkpoint import DamagedCheckpointError
    from eapm.safe_load import UnsafeCheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    # detectron2's anchor generator calls torch.meshgrid without indexing= (harmless)
    warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
    try:
        files = input_files(args.input)
        for path in files:
            if os.path.abspath(os.path.dirname(path)) == os.path.abspath(args.output):
                raise ValueError(
                    f"--output {args.output} holds the input {path}: it would be "
                    "overwritten; choose another folder"
                )
        predictor = load_predictor(args.config_file, args.opts, args.confidence_threshold)
    except (FileNotFoundError, ValueError, DamagedCheckpointError, UnsafeCheckpointError) as e:
        parser.error(str(e))
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in files:
        try:
            out, n, seconds = draw(predictor, path, args.output, args.confidence_threshold)
        except ValueError as e:
            parser.error(str(e))
        written.append(out)
        print(f"{path}: {n} detection{'' if n == 1 else 's'} in {seconds:.2f} s", flush=True)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
