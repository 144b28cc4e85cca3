"""eapm.paper_results: the paper's rows cover the COCO configs of the repository."""

from __future__ import annotations

import os

from tests.helpers import REPO


def test_paper_results_cover_the_coco_configs():
    from eapm.paper_results import PAPER_ROWS, TEST_DEV, VAL, paper_configs, paper_result

    folders = ("COCO-Detection", "COCO-InstanceSegmentation")
    for name in paper_configs():
        files = [os.path.join(REPO, "configs", d, name + ".yaml") for d in folders]
        assert sum(os.path.isfile(f) for f in files) == 1, name  # one config of that name
    assert len([k for k in PAPER_ROWS if k[1] == VAL]) == 12 + 7
    assert len([k for k in PAPER_ROWS if k[1] == TEST_DEV]) == 12  # Table 3: 6 rows x 2
    assert paper_result("retinanet_R_101_FPN_1x_ghm", "coco_2017_test-dev").values == (
        39.5, 58.6, 42.0, 22.2, 42.4, 50.1,
    )  # fmt: skip
    assert paper_result("mask_rcnn_R_50_FPN_1x").as_dict()["APl"] == 47.5  # test-dev only
    assert paper_result("retinanet_R_50_FPN_1x", "coco_2017_test-dev").values[0] == 36.9
    assert paper_result("retinanet_R_50_FPN_1x", "coco_2017_val").values[0] == 35.6
    assert paper_result("libra_retinanet_R_50_FPN_1x", "coco_2017_test-dev").values[0] == 37.8
    assert paper_result("libra_retinanet_R_50_FPN_1x", "coco_2017_val").values[0] == 37.6
    assert paper_result("libra_retinanet_R_50_FPN_1x", "eapm_shapes_val") is None
    assert paper_result("libra_retinanet_R_101_FPN_1x").values[:2] == (40.0, 59.7)
    assert paper_result("libra_rcnn_R_50_FPN_1x_eapm_theta1.5").as_dict()["APm"] == 42.3
