"""The config decides what runs, per model: compilation is a constructor argument of
each model (no process-global switch), capabilities are asked of the registered
classes (a user's subclass of an EAPM model works; a class that cannot honour a
switched-on key is rejected naming the key, before anything is built), and the
detectron2 bodies the project adapts are pinned to their upstream source."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.events import EventStorage

import eapm
from eapm import losses
from eapm.modeling import EAPMRetinaNet
from tests.helpers import CONFIGS, grad_norms, make_batch, tiny_cfg

QUICKSTART = f"{CONFIGS}/quickstart/eapm_retinanet.yaml"


@META_ARCH_REGISTRY.register()
class UserEAPMRetinaNet(EAPMRetinaNet):
    """A user's own model built on EAPMRetinaNet (say, with another head)."""


@META_ARCH_REGISTRY.register()
class UserRetinaNet(RetinaNet):
    """A user's own subclass of detectron2's RetinaNet: it has no EAPM loss. ``built`` counts
    the real builds (the config validation builds on the meta device: no memory, no weights)."""

    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += next(self.parameters()).device.type != "meta"


@pytest.fixture
def compiled_calls(monkeypatch):
    """Replaces torch.compile by a recorder: a "compiled" kernel logs its name and runs
    the eager kernel. Returns the log; the compiled-kernel cache is empty before and
    after."""
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return compiled

    losses.clear_compiled_kernels()
    monkeypatch.setattr(torch, "compile", fake_compile)
    yield calls
    losses.clear_compiled_kernels()


def _train_step(model, batch, it=0):
    model.train()
    torch.manual_seed(it)
    with EventStorage(it) as storage:
        out = model(batch)
    total = sum(out.values())
    total.backward()
    return out, storage


def _libra_rcnn(compile_kernels: bool):
    return build_model(
        tiny_cfg("quickstart/eapm_libra_rcnn.yaml", "MODEL.EAPM.COMPILE", compile_kernels)
    )


def _eapm_retinanet(compile_kernels: bool):
    return build_model(
        tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.COMPILE", compile_kernels)
    )


def test_compile_is_per_model_rcnn_first(compiled_calls):
    """Libra R-CNN with COMPILE True, then EAPMRetinaNet with COMPILE False, in one
    process: each runs its own kernel path."""
    batch = make_batch(2, num_boxes=(4, 2))
    rcnn = _libra_rcnn(True)
    retina = _eapm_retinanet(False)
    _train_step(rcnn, batch)
    assert compiled_calls == ["_bl1_kernel"]  # its ROI box loss, compiled
    _, storage = _train_step(retina, batch)
    assert "eapm/cls_mf_pos" in storage.latest() and "eapm/reg_mf" in storage.latest()
    assert compiled_calls == ["_bl1_kernel"]  # EAPM on, but eager: nothing compiled ran
    _train_step(rcnn, batch, 1)  # the R-CNN still compiles after the other model ran
    assert compiled_calls == ["_bl1_kernel"] * 2


def test_compile_is_per_model_retinanet_first(compiled_calls):
    """The opposite order: building and running an eager model first does not stop the
    compiled one, and vice versa."""
    batch = make_batch(2, num_boxes=(4, 2))
    retina = _eapm_retinanet(False)
    _train_step(retina, batch)
    assert compiled_calls == []
    rcnn = _libra_rcnn(True)
    _train_step(rcnn, batch)
    assert compiled_calls == ["_bl1_kernel"]
    _train_step(retina, batch, 1)
    assert compiled_calls == ["_bl1_kernel"]
    _train_step(_eapm_retinanet(True), batch)  # the same detector, compiled
    assert compiled_calls == ["_bl1_kernel", "_focal_sum", "_bl1_kernel"]


def test_user_subclass_of_eapm_retinanet_trains_with_eapm():
    cfg = eapm.load_config(QUICKSTART, ["MODEL.META_ARCHITECTURE", "UserEAPMRetinaNet"])
    for key, value in (("RESNETS.DEPTH", 18), ("FPN.OUT_CHANNELS", 32), ("RETINANET.NUM_CONVS", 1)):
        cfg.merge_from_list([f"MODEL.{key}", value])
    model = build_model(cfg)
    assert type(model) is UserEAPMRetinaNet
    assert model.eapm_cls_mu == 1.5 and model.eapm_reg_theta == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = make_batch(2, size=64, num_boxes=(5, 3))
    before = model.head.cls_score.weight.detach().clone()
    for it in range(2):
        out, storage = _train_step(model, batch, it)
        assert set(out) == {"loss_cls", "loss_box_reg"}
        assert all(torch.isfinite(v) for v in out.values())
        norms = grad_norms(model, ["head.cls_score", "head.bbox_pred", "backbone.bottom_up"])
        assert all(v > 0 and math.isfinite(v) for v in norms.values()), norms
        latest = storage.latest()  # EAPM ran: its diagnostics are there, MF > 1
        assert latest["eapm/cls_mf_pos"][0] > 1.0 and latest["eapm/reg_mf"][0] >= 1.0
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.head.cls_score.weight)


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.EAPM.REG.ENABLED", "False"], "MODEL.EAPM.CLS.ENABLED"),
        (["MODEL.EAPM.CLS.ENABLED", "False"], "MODEL.EAPM.REG.ENABLED"),
        (
            ["MODEL.EAPM.CLS.ENABLED", "False", "MODEL.EAPM.REG.ENABLED", "False"],
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",  # the balanced_l1 box loss it does not have
        ),
    ],
)
def test_user_subclass_of_detectron2_retinanet_rejected_before_building(opts, key):
    UserRetinaNet.built = 0
    with pytest.raises(ValueError, match=f"^Invalid config {key.replace('.', '[.]')} = "):
        eapm.load_config(QUICKSTART, ["MODEL.META_ARCHITECTURE", "UserRetinaNet", *opts])
    assert UserRetinaNet.built == 0
    # with nothing switched on that it cannot honour, the same class is accepted
    cfg = eapm.load_config(
        QUICKSTART,
        ["MODEL.META_ARCHITECTURE", "UserRetinaNet", "MODEL.EAPM.CLS.ENABLED", "False",
         "MODEL.EAPM.REG.ENABLED", "False", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1"],
    )  # fmt: skip
    assert cfg.MODEL.META_ARCHITECTURE == "UserRetinaNet"


def test_fcos_cannot_honour_eapm_regression():
    with pytest.raises(
        ValueError, match=r"^Invalid config MODEL\.EAPM\.REG\.ENABLED = True: .*EAPMFCOS"
    ):
        eapm.load_config(f"{CONFIGS}/quickstart/eapm_fcos.yaml", ["MODEL.EAPM.REG.ENABLED", "True"])


def test_unregistered_architecture_named():
    with pytest.raises(ValueError, match=r"MODEL\.META_ARCHITECTURE = 'NoSuchNet': not registered"):
        eapm.load_config(QUICKSTART, ["MODEL.META_ARCHITECTURE", "NoSuchNet"])


def test_one_way_to_say_off():
    """mu = 0 (theta = 0) with EAPM enabled is the same model as EAPM disabled: the same
    constructor arguments, the same loss path (detectron2's focal loss), the same values."""
    off = tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.CLS.ENABLED", False,
                   "MODEL.EAPM.REG.ENABLED", False)  # fmt: skip
    zero = tiny_cfg(
        "quickstart/eapm_retinanet.yaml", "MODEL.EAPM.CLS.MU", 0.0, "MODEL.EAPM.REG.THETA", 0.0
    )
    a, b = build_model(off), build_model(zero)
    for name in ("eapm_cls_mu", "eapm_reg_theta"):  # what from_config gave the constructor
        assert getattr(a, name) == getattr(b, name) == 0.0
    b.load_state_dict(a.state_dict())
    batch = make_batch(2, num_boxes=(4, 1))
    la, sa = _train_step(a, batch)
    lb, sb = _train_step(b, batch)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=0)
    assert not any(k.startswith("eapm/") for k in sa.latest())
    assert not any(k.startswith("eapm/") for k in sb.latest())


def test_histograms_do_not_change_the_loss(monkeypatch):
    """A histogram iteration computes the loss with the same kernel as any other."""
    plain = build_model(tiny_cfg("quickstart/eapm_retinanet.yaml"))
    hist = build_model(tiny_cfg("quickstart/eapm_retinanet.yaml", "MODEL.EAPM.HISTOGRAM_PERIOD", 1))
    hist.load_state_dict(plain.state_dict())
    batch = make_batch(2, num_boxes=(4, 1))
    tags = []
    monkeypatch.setattr(EventStorage, "put_histogram", lambda self, tag, *a, **k: tags.append(tag))
    la, _ = _train_step(plain, batch)
    assert tags == []
    lb, _ = _train_step(hist, batch)
    assert {"eapm/cls_dif_pos", "eapm/cls_mf_neg", "eapm/reg_gos", "eapm/reg_mf"} <= set(tags)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=0)
    g_plain = plain.head.cls_score.weight.grad
    torch.testing.assert_close(hist.head.cls_score.weight.grad, g_plain, rtol=0, atol=0)


def test_adapted_detectron2_bodies_match_the_installed_detectron2():
    """Each method that repeats a detectron2 body is pinned to the hash of that body's
    source; a new detectron2 that changes one fails here, naming it (update the
    adaptation, then its hash in the @adapted_from line)."""
    import eapm.checkpoint  # noqa: F401  (registers its adaptation)
    from eapm.upstream import ADAPTED, changed_upstream

    assert set(ADAPTED) == {
        "eapm.checkpoint.EAPMCheckpointer._load_file_as_data",
        "eapm.modeling.retinanet.EAPMRetinaNet.losses",
        "eapm.modeling.fcos.EAPMFCOS.losses",
        "eapm.modeling.roi_heads.LibraROIHeads._sample_proposals",
    }
    assert changed_upstream() == []


def test_changed_upstream_is_detected(monkeypatch):
    from eapm.upstream import ADAPTED, Adapted, changed_upstream

    def not_the_pinned_body():
        pass

    monkeypatch.setitem(
        ADAPTED, "x.Y.f", Adapted("x.Y.f", not_the_pinned_body, "detectron2/x.py", "0" * 40)
    )
    (line,) = changed_upstream()
    assert line.startswith("x.Y.f adapts ") and "not_the_pinned_body (detectron2/x.py)" in line
