"""the guards on what enters from outside: reading a genuine R-50-FPN RetinaNet
checkpoint through eapm.safe_load vs a plain torch.load of the same file, and the
COCO-json check (json level) of a dataset of N vs 2N annotations (linear: ~2x)."""

from __future__ import annotations

import os
import tempfile

import torch

from eapm.utils.benchmark import interleaved

from . import register


def _r50_checkpoint(folder: str) -> str:
    from detectron2.modeling import build_model

    from eapm.utils.testing import repo_cfg

    cfg = repo_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "MODEL.WEIGHTS", "",
                   "MODEL.DEVICE", "cpu")  # fmt: skip
    path = os.path.join(folder, "model_final.pth")
    torch.save({"model": build_model(cfg).state_dict(), "iteration": 89999}, path)
    return path


def _coco(num_images: int, per_image: int) -> dict:
    images = [{"id": i, "file_name": f"{i:07d}.jpg", "width": 640, "height": 480}
              for i in range(num_images)]  # fmt: skip
    anns = [
        {"id": i * per_image + k, "image_id": i, "category_id": 1 + k % 80, "iscrowd": 0,
         "bbox": [10.0 + k, 20.0, 50.0, 40.0], "area": 2000.0,
         "segmentation": [[10.0 + k, 20.0, 60.0 + k, 20.0, 60.0 + k, 60.0, 10.0 + k, 60.0]]}
        for i in range(num_images)
        for k in range(per_image)
    ]  # fmt: skip
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": cats}


@register("guards")
def run(args, reporter) -> None:
    from eapm.data.validate import validate_coco
    from eapm.safe_load import load_checkpoint_file

    with tempfile.TemporaryDirectory(prefix="eapm_bench_guards_") as tmp:
        path = _r50_checkpoint(tmp)
        size = os.path.getsize(path) / 2**20
        times = interleaved(
            {
                "torch.load": lambda: torch.load(path, map_location="cpu"),
                "eapm.safe_load": lambda: load_checkpoint_file(path),
            },
            args.repeats,
            args.warmup,
        )
        reporter.timings(
            f"[guards] read a genuine R-50-FPN RetinaNet checkpoint ({size:.0f} MiB)",
            times,
            "torch.load",
        )
    small, large = _coco(7000, 12), _coco(14000, 12)  # 84k and 168k annotations
    times = interleaved(
        {
            f"{len(small['annotations'])} annotations": lambda: validate_coco(
                small, "bench", "bench.json", "."
            ),
            f"{len(large['annotations'])} annotations": lambda: validate_coco(
                large, "bench", "bench.json", "."
            ),
        },
        args.repeats,
        args.warmup,
    )
    reporter.timings(
        "[guards] COCO-json check, json level (segmentation, ids, trainable counts)",
        times,
        f"{len(small['annotations'])} annotations",
    )
