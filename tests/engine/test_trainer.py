"""eapm/engine/trainer.py, EAPMTrainer: its model in channels-last memory format
(MODEL.CHANNELS_LAST) gives the same losses and gradients; the whole training step (data order,
augmentation, initialisation, losses) repeats exactly with the same SEED."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import dump, make_batch, make_coco, tiny_cfg, tiny_opts


@pytest.mark.parametrize(
    "config",
    [
        "quickstart/eapm_retinanet.yaml",
        "quickstart/eapm_fcos.yaml",
        "quickstart/eapm_libra_rcnn.yaml",
    ],
)
def test_channels_last_model_gives_the_same_losses_and_gradients(config, storage):
    """MODEL.CHANNELS_LAST changes the memory format of the parameters (EAPMTrainer.
    build_model), not the network: the same weights give the same losses and gradients,
    for the dense detectors and for Libra R-CNN (RoIAlign on channels-last features)."""
    from eapm.engine import EAPMTrainer

    models = {}
    for cl in (False, True):
        cfg = tiny_cfg(config, "MODEL.EAPM.COMPILE", False, "MODEL.CHANNELS_LAST", cl)
        torch.manual_seed(0)
        models[cl] = EAPMTrainer.build_model(cfg)
    convs = [m.weight for m in models[True].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(
        m.weight.is_contiguous() for m in models[False].modules() if isinstance(m, torch.nn.Conv2d)
    )
    batch = make_batch(2, size=64, num_boxes=(3, 1), num_classes=4, seed=2)
    losses, grads = {}, {}
    for cl, model in models.items():
        model.train()
        torch.manual_seed(1)  # the R-CNN samplers draw random numbers
        out = model(batch)
        sum(out.values()).backward()
        losses[cl] = {k: v.item() for k, v in out.items()}
        grads[cl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses[True].keys() == losses[False].keys() and len(losses[True]) >= 2
    for k, v in losses[False].items():
        assert math.isfinite(v)
        assert losses[True][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert grads[True].keys() == grads[False].keys()
    assert len(grads[True]) == len(list(models[True].parameters()))  # every parameter
    # float32 rounding differs between the memory formats' kernels. Measured here: parameters
    # with a real gradient agree to 1e-4 (relative norm), except the first ResNet stages of
    # Libra R-CNN, up to 1.5% (the losses to 1e-4, asserted above). A layout error would be
    # of order 1; conv biases before BatchNorm have a zero gradient up to rounding (atol).
    for n, g in grads[False].items():
        assert torch.isfinite(grads[True][n]).all(), n
        err = (grads[True][n] - g).norm().item()
        assert err <= 0.03 * g.norm().item() + 1e-6, (n, err, g.norm().item())
    flat = {cl: torch.cat([g.flatten() for g in grads[cl].values()]) for cl in grads}
    # measured: 0.47% of the whole gradient's norm with the head on P3-P7, 0.73% on P2-P6 (the
    # stem and res2 then get the head's gradient at stride 4: the first stages, as Libra's)
    assert (flat[True] - flat[False]).norm() <= 1e-2 * flat[False].norm()
    assert flat[False].norm() > 0


def _train_tiny(config, root, name, iters, **opts):
    """EAPMTrainer of ``config`` (tiny) trained ``iters`` iterations on the COCO-json split
    ``root``/train.json registered as ``name`` (``opts``: more overrides), seeded as
    ``default_setup`` seeds in train_net.py: (its total losses, the trainer)."""
    from detectron2.utils.env import seed_all_rng

    from eapm.engine import EAPMTrainer

    tag = "_".join(f"{k}{v}" for k, v in sorted(opts.items()))
    cfg = tiny_cfg(config)
    over = {"DATASETS.TRAIN": f"('{name}',)", "DATASETS.TEST": "()", **opts}
    cfg.merge_from_list(tiny_opts(f"{root}/out_{tag}", iters, f"{root}/no_embedded", **over))
    cfg.DATASETS.COCO_JSON = [[name, f"{root}/train.json", f"{root}/train"]]
    seed_all_rng(cfg.SEED)
    trainer = EAPMTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return [v for v, _ in trainer.storage.history("total_loss").values()], trainer


def test_trainer_is_deterministic(tmp_path, one_thread):
    """The whole training step (data order, augmentation, initialisation, losses) of
    EAPMTrainer repeats exactly with the same SEED: the first iterations' losses."""
    root = str(tmp_path)
    dump(make_coco(root, "train", 8, 5, boxes_per_image=(2, 1, 0)), f"{root}/train.json")
    config = "quickstart/eapm_retinanet.yaml"
    a, b, c = (_train_tiny(config, root, "det_train", 3, SEED=s, OUTPUT_DIR=f"{root}/{t}")[0]
               for s, t in ((1, "a"), (1, "b"), (2, "c")))  # fmt: skip
    assert len(a) == 3 and a == b
    assert a != c


def test_periodic_evaluation_does_not_change_training(tmp_path, one_thread):
    """Faster R-CNN draws its RPN and ROI samples from torch's global generator, and iterating
    the test loader draws from it too (its base seed): evaluation runs inside
    ``rng_isolated``, so a training that evaluates every 2 iterations takes the same steps as
    one that never does (the losses after the evaluation, bit for bit)."""
    from eapm.engine import EAPMTrainer

    root = str(tmp_path)
    dump(make_coco(root, "train", 4, 5, boxes_per_image=(2, 1)), f"{root}/train.json")
    opts = {"DATASETS.TEST": "('eval_train',)", "MODEL.ROI_HEADS.NUM_CLASSES": 2, "SEED": 3}
    config = "quickstart/faster_rcnn.yaml"
    plain, trainer = _train_tiny(config, root, "eval_train", 5, **opts)
    evaluated, _ = _train_tiny(config, root, "eval_train", 5, **opts, **{"TEST.EVAL_PERIOD": 2})
    assert len(plain) == 5 and evaluated == plain
    # the control: without the isolation, the test loader moves the generator
    before = torch.get_rng_state()
    for _ in trainer.build_test_loader(trainer.cfg, "eval_train"):
        break
    assert not torch.equal(before, torch.get_rng_state())
    before = torch.get_rng_state()
    EAPMTrainer.test(trainer.cfg, trainer.model)
    assert torch.equal(before, torch.get_rng_state())
