"""The paper's reported COCO numbers (Wu et al., EAPM, Tables 1-3), keyed by the names
of this repository's configs in ``configs/COCO-Detection/`` (and
``configs/COCO-InstanceSegmentation/`` for Mask R-CNN R-50).

Values are box AP in percent: (AP, AP50, AP75, APs, APm, APl). Tables 1 and 2 are on
``coco_2017_val``, Table 3 on ``coco_2017_test-dev``. The paper trained with mmdetection
(4 GPUs x 2 images, 12 epochs); see docs/detectors.md for the differences to detectron2.

Used by ``tools/collect_results.py --paper``.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ["METRICS", "PaperRow", "PAPER_ROWS", "paper_result", "VAL", "TEST_DEV"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VAL = "coco_2017_val"
TEST_DEV = "coco_2017_test-dev"


class PaperRow(NamedTuple):
    table: str  # "Table 1" ...
    setting: str  # the row label in the paper
    dataset: str  # VAL or TEST_DEV
    values: Tuple[float, float, float, float, float, float]  # METRICS order

    def as_dict(self) -> Dict[str, float]:
        return dict(zip(METRICS, self.values))


def _rows(table: str, dataset: str, rows) -> Dict[Tuple[str, str], PaperRow]:
    return {
        (config, dataset): PaperRow(table, setting, dataset, tuple(values))
        for config, setting, values in rows
    }


# (config name, the paper's row label, values); Table 2's first row repeats Table 1's
# "Libra RetinaNet mu = 1.5" row (it is the baseline of the regression experiments).
PAPER_ROWS: Dict[Tuple[str, str], PaperRow] = {}
PAPER_ROWS.update(
    _rows(
        "Table 1",
        VAL,
        [
            (
                "libra_retinanet_R_50_FPN_1x",
                "Libra RetinaNet",
                (37.6, 56.9, 40.1, 21.7, 41.5, 49.6),
            ),
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu1.0",
                "Libra RetinaNet, mu = 1.0",
                (37.9, 58.1, 40.2, 22.4, 41.9, 49.0),
            ),
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu1.5",
                "Libra RetinaNet, mu = 1.5",
                (38.2, 58.0, 40.7, 22.4, 41.5, 50.3),
            ),
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu2.0",
                "Libra RetinaNet, mu = 2.0",
                (38.0, 58.0, 40.5, 22.3, 41.6, 49.7),
            ),
            ("retinanet_R_50_FPN_1x", "RetinaNet", (35.6, 55.5, 38.3, 20.0, 39.6, 46.8)),
            (
                "retinanet_R_50_FPN_1x_eapm_mu1.0",
                "RetinaNet, mu = 1.0",
                (37.0, 56.6, 39.5, 20.4, 40.4, 49.1),
            ),
            (
                "retinanet_R_50_FPN_1x_eapm_mu1.5",
                "RetinaNet, mu = 1.5",
                (37.1, 56.6, 39.6, 20.5, 40.6, 49.1),
            ),
            (
                "retinanet_R_50_FPN_1x_eapm_mu2.0",
                "RetinaNet, mu = 2.0",
                (36.7, 55.9, 39.3, 20.7, 40.0, 48.2),
            ),
            ("fcos_R_50_FPN_1x", "FCOS", (35.7, 55.8, 38.4, 20.2, 39.2, 47.0)),
            ("fcos_R_50_FPN_1x_eapm_mu1.0", "FCOS, mu = 1.0", (36.9, 56.7, 39.2, 21.3, 40.7, 48.2)),
            ("fcos_R_50_FPN_1x_eapm_mu1.5", "FCOS, mu = 1.5", (37.1, 56.8, 39.4, 22.3, 40.8, 47.8)),
            ("fcos_R_50_FPN_1x_eapm_mu2.0", "FCOS, mu = 2.0", (36.8, 56.5, 39.0, 21.0, 40.5, 47.6)),
        ],
    )
)
PAPER_ROWS.update(
    _rows(
        "Table 2",
        VAL,
        [
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0",
                "Libra RetinaNet (mu = 1.5), theta = 1.0",
                (38.4, 58.2, 40.8, 22.5, 41.9, 50.0),
            ),
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.5",
                "Libra RetinaNet (mu = 1.5), theta = 1.5",
                (38.2, 57.9, 40.6, 22.3, 41.8, 50.0),
            ),
            (
                "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta2.0",
                "Libra RetinaNet (mu = 1.5), theta = 2.0",
                (38.3, 58.0, 40.9, 22.2, 41.8, 49.8),
            ),
            ("libra_rcnn_R_50_FPN_1x", "Libra R-CNN", (38.3, 59.5, 41.9, 22.1, 42.0, 48.5)),
            (
                "libra_rcnn_R_50_FPN_1x_eapm_theta1.0",
                "Libra R-CNN, theta = 1.0",
                (38.5, 59.1, 41.8, 21.8, 42.1, 49.2),
            ),
            (
                "libra_rcnn_R_50_FPN_1x_eapm_theta1.5",
                "Libra R-CNN, theta = 1.5",
                (38.6, 59.2, 41.9, 22.4, 42.3, 49.1),
            ),
            (
                "libra_rcnn_R_50_FPN_1x_eapm_theta2.0",
                "Libra R-CNN, theta = 2.0",
                (38.6, 59.2, 42.1, 22.5, 42.0, 49.6),
            ),
        ],
    )
)
# Table 3 (test-dev), every row. The paper quotes Faster / Mask R-CNN, RetinaNet and GHM
# from other work (trained with mmdetection); here they are detectron2's Faster / Mask
# R-CNN, EAPMRetinaNet with detectron2's losses, and GHM RetinaNet (GHM-C + GHM-R).
_TABLE3 = {
    50: [
        ("faster_rcnn", "Faster R-CNN", (37.7, 58.7, 40.8, 21.7, 40.6, 46.7)),
        ("mask_rcnn", "Mask R-CNN", (38.3, 59.3, 41.6, 22.2, 41.2, 47.5)),
        ("retinanet", "RetinaNet", (36.9, 56.2, 39.3, 20.5, 39.9, 46.3)),
        ("retinanet|_ghm", "GHM", (37.5, 56.4, 39.9, 21.1, 39.8, 47.0)),
        ("libra_retinanet", "Libra RetinaNet", (37.8, 56.9, 40.5, 21.2, 40.9, 47.7)),
        (
            "libra_retinanet|_eapm_mu1.5_theta1.0",
            "EAPM (ours)",
            (38.5, 58.4, 41.1, 21.7, 41.4, 48.1),
        ),
    ],
    101: [
        ("faster_rcnn", "Faster R-CNN", (39.7, 60.7, 43.2, 22.5, 42.9, 49.9)),
        ("mask_rcnn", "Mask R-CNN", (40.4, 61.2, 44.1, 23.1, 43.5, 50.8)),
        ("retinanet", "RetinaNet", (39.0, 58.6, 41.7, 21.9, 42.2, 49.3)),
        ("retinanet|_ghm", "GHM", (39.5, 58.6, 42.0, 22.2, 42.4, 50.1)),
        ("libra_retinanet", "Libra RetinaNet", (40.0, 59.7, 42.8, 22.8, 43.1, 50.7)),
        (
            "libra_retinanet|_eapm_mu1.5_theta1.0",
            "EAPM (ours)",
            (40.4, 60.5, 43.2, 23.2, 43.6, 51.3),
        ),
    ],
}


def _table3_config(name: str, depth: int) -> str:
    """ "retinanet|_ghm", 50 -> "retinanet_R_50_FPN_1x_ghm"."""
    model, _, suffix = name.partition("|")
    return f"{model}_R_{depth}_FPN_1x{suffix}"


PAPER_ROWS.update(
    _rows(
        "Table 3",
        TEST_DEV,
        [
            (_table3_config(name, depth), f"ResNet-{depth}-FPN {label}", values)
            for depth, rows in _TABLE3.items()
            for name, label, values in rows
        ],
    )
)


def paper_configs() -> Tuple[str, ...]:
    """Every config name that has a paper number (sorted, unique)."""
    return tuple(sorted({c for c, _ in PAPER_ROWS}))


def paper_result(config: str, dataset: Optional[str] = None) -> Optional[PaperRow]:
    """The paper's row for ``config`` evaluated on ``dataset``.

    ``dataset`` containing "test-dev" selects Table 3, another COCO name (containing
    "coco", e.g. coco_2017_val) Tables 1-2; other datasets have no paper numbers.
    Without a dataset the val row is preferred, then the test-dev row.
    Returns None where the paper has no such row."""
    if dataset is not None:
        if "test-dev" in dataset:
            return PAPER_ROWS.get((config, TEST_DEV))
        return PAPER_ROWS.get((config, VAL)) if "coco" in dataset.lower() else None
    return PAPER_ROWS.get((config, VAL)) or PAPER_ROWS.get((config, TEST_DEV))
