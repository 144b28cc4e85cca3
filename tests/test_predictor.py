"""eapm/predictor.py: EAPMPredictor of a yacs config and of its LazyConfig twin (metadata,
evaluation mode, device, score threshold, input format and resizing); set_score_threshold on
the R-CNN (every cascade stage) and FCOS LazyConfigs. (demo/demo.py, which stands on it:
tools/test_demo.py.)"""

from __future__ import annotations

import pytest

from tests.helpers import QUICKSTART_LAZY as LAZY
from tests.helpers import QUICKSTART_YAML as YAML
from tests.helpers import weights_opts


def test_predictor_metadata_and_device(initial_weights):
    from eapm.model_zoo import get_config
    from eapm.predictor import EAPMPredictor, set_score_threshold

    for config, kind in ((YAML, "yaml"), (LAZY, "lazy")):
        cfg = get_config(config, weights_opts(kind, initial_weights[kind]))
        keys = set_score_threshold(cfg, 0.25)
        predictor = EAPMPredictor(cfg, "cpu")
        assert predictor.metadata.thing_classes == ["bar", "ellipse", "triangle", "ring"]
        assert predictor.model.training is False
        assert {p.device.type for p in predictor.model.parameters()} == {"cpu"}
        assert predictor.model.test_score_thresh == 0.25, keys
        assert predictor.input_format == "BGR"
        assert tuple(predictor.aug.short_edge_length) == (128, 128)
        assert predictor.aug.max_size == 128


def test_set_score_threshold_on_rcnn_and_fcos_lazy_configs():
    from eapm.model_zoo import get_config
    from eapm.predictor import set_score_threshold

    cascade = get_config("cascade_rcnn_R_50_FPN_1x.py")
    assert set_score_threshold(cascade, 0.4) == [
        f"model.roi_heads.box_predictors[{i}].test_score_thresh" for i in range(3)
    ]
    assert [p.test_score_thresh for p in cascade.model.roi_heads.box_predictors] == [0.4] * 3
    fcos = get_config("fcos_R_50_FPN_1x.py")
    assert set_score_threshold(fcos, 1.0) == ["model.test_score_thresh"]
    assert fcos.model.test_score_thresh == 0.999  # FCOS's must stay below 1
    faster = get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.py")
    set_score_threshold(faster, 0.3)
    assert faster.model.roi_heads.box_predictor.test_score_thresh == 0.3
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        set_score_threshold(faster, 1.5)
