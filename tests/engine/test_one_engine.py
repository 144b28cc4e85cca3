"""One engine under both config systems: the yacs quickstart (EAPMTrainer,
eapm/engine/trainer.py) and its LazyConfig twin (eapm/lazy.py) train the same run (bitwise
the same weights), and save and restore the same trainer state in process. (The gradient
clipping both use: test_solver.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import CONFIGS, dump, make_coco

TRAIN = "engine_twins_train"
ITERS = 4


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    """A tiny COCO-json train split (8 images of 64 px) registered as ``TRAIN``."""
    from detectron2.data import DatasetCatalog

    from eapm.data import register_coco_json

    root = tmp_path_factory.mktemp("twins")
    js = dump(
        make_coco(str(root), "train", 8, 0, boxes_per_image=(2, 1, 3, 0)), str(root / "t.json")
    )
    if TRAIN not in DatasetCatalog.list():
        register_coco_json(TRAIN, js, str(root / "train"))
    return root


def _yacs_trainer(out, max_iter=ITERS, *opts):
    """The yacs quickstart (eapm_retinanet.yaml) on ``TRAIN``: 2 images of 64 px per
    iteration, warm-up 2, learning rate x0.1 for the last; no evaluation; seeded as
    ``default_setup`` seeds (SEED)."""
    from detectron2.utils.env import seed_all_rng

    import eapm
    from eapm.engine import EAPMTrainer

    cfg = eapm.load_config(
        os.path.join(CONFIGS, "quickstart", "eapm_retinanet.yaml"),
        [
            "DATASETS.TRAIN", f"('{TRAIN}',)",
            "DATASETS.TEST", "()",
            "MODEL.RETINANET.NUM_CLASSES", "2",
            "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.WARMUP_ITERS", "2",
            "SOLVER.STEPS", f"({max_iter - 1},)",
            "OUTPUT_DIR", str(out),
            "DATASETS.EMBEDDED_ROOT", str(out / "never"),
            *opts,
        ],
    )  # fmt: skip
    seed_all_rng(cfg.SEED)
    return EAPMTrainer(cfg)


def _lazy_cfg(out, max_iter=ITERS, *overrides):
    """The LazyConfig twin (eapm_retinanet.py) with the settings of ``_yacs_trainer``."""
    from eapm.lazy import load_lazy_config

    cfg = load_lazy_config(
        os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py"),
        [
            f"dataloader.train.dataset.names={TRAIN}",
            "dataloader.train.total_batch_size=2",
            "model.num_classes=2",
            f"train.max_iter={max_iter}",
            f"lr_multiplier.warmup_length={2 / max_iter}",
            "lr_multiplier.scheduler.values=[1.0,0.1]",
            f"lr_multiplier.scheduler.milestones=[{max_iter - 1}]",
            f"lr_multiplier.scheduler.num_updates={max_iter}",
            f"train.output_dir={out}",
            *overrides,
        ],
    )
    resize = cfg.dataloader.train.mapper.augmentations[0]
    resize.short_edge_length, resize.max_size = (64,), 64
    del cfg.dataloader["evaluator"]  # no evaluation (yacs: DATASETS.TEST empty)
    return cfg


def _lazy_trainer(cfg, resume=False):
    """``eapm.lazy.build_trainer`` of ``cfg``, seeded as ``default_setup`` seeds."""
    from detectron2.utils.env import seed_all_rng

    from eapm.lazy import build_trainer

    seed_all_rng(cfg.train.seed)
    return build_trainer(cfg, resume=resume)


def test_yacs_and_lazy_quickstart_train_bitwise_the_same_weights(tiny_train, tmp_path):
    yacs = _yacs_trainer(tmp_path / "yacs")
    yacs.resume_or_load(resume=False)
    init = {k: v.clone() for k, v in yacs.model.state_dict().items()}
    yacs.train()
    cfg = _lazy_cfg(tmp_path / "lazy")
    lazy = _lazy_trainer(cfg)
    lazy.train(lazy.start_iter, cfg.train.max_iter)
    assert yacs.iter == lazy.iter == ITERS  # detectron2: max_iter after the last step
    a, b = yacs.model.state_dict(), lazy.model.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # and the same optimizer state (AdamW's moments, the same groups and hyper-parameters)
    oa, ob = yacs.optimizer.state_dict(), lazy.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        assert all(torch.equal(s[k], ob["state"][i][k]) for k in s)
    # they trained: the weights moved away from the initialisation
    assert not torch.equal(init["head.cls_score.weight"], a["head.cls_score.weight"])


def test_lazy_evaluation_leaves_the_random_generators_as_it_found_them(tiny_train, tmp_path):
    """The LazyConfig loop's evaluation (``do_test``, its ``EvalHook``) runs inside
    ``rng_isolated`` as ``EAPMTrainer.test`` does (test_trainer.py): iterating the test loader
    draws from torch's global generator, evaluation gives it back unchanged."""
    import random

    from detectron2.config import instantiate

    from eapm.lazy import do_test

    cfg = _lazy_cfg(tmp_path / "lazy_eval")
    cfg.dataloader.test.dataset.names = TRAIN
    cfg.dataloader.test.num_workers = 0
    cfg.dataloader.evaluator = _lazy_cfg_with_evaluator(tmp_path / "lazy_eval")
    trainer = _lazy_trainer(cfg)
    before = torch.get_rng_state()
    for _ in instantiate(cfg.dataloader.test):  # the control: the loader moves it
        break
    assert not torch.equal(before, torch.get_rng_state())
    before, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    results = do_test(cfg, trainer.model)
    assert "bbox" in results  # it evaluated
    assert torch.equal(before, torch.get_rng_state()) and random.getstate() == py
    assert np.array_equal(npy, np.random.get_state()[1])


def _lazy_cfg_with_evaluator(out):
    """The twin's COCO evaluator, on ``TRAIN``, writing under ``out``."""
    from eapm.lazy import load_lazy_config

    cfg = load_lazy_config(
        os.path.join(CONFIGS, "quickstart", "eapm_retinanet.py"), [f"train.output_dir={out}"]
    )
    cfg.dataloader.evaluator.dataset_name = TRAIN
    return cfg.dataloader.evaluator


# ---------------------------------------------------------------------------
# trainer-level save and restore, in process
# ---------------------------------------------------------------------------
def _snapshot(trainer):
    """This process's random generators, the model's EMA loss normaliser and the loader
    position after the trainer's current iteration."""
    import random

    sampler = trainer.data_loader.batch_sampler
    n = trainer.iter - trainer.start_iter
    return {
        "python": random.getstate(),
        "numpy": [np.asarray(x).tolist() for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "normalizer": getattr(trainer.model, "loss_normalizer", None),
        "loader": sampler.state_after(n) if n >= 0 else sampler.state_dict(),
    }


def _assert_snapshots_equal(a, b):
    assert a["python"] == b["python"] and a["numpy"] == b["numpy"]
    assert torch.equal(a["torch"], b["torch"])
    assert a["normalizer"] == b["normalizer"] and a["normalizer"] is not None
    assert a["loader"] == b["loader"]


def _record_batches(trainer):
    """The mapped training items of ``trainer`` from now on (file name, image, boxes), in
    the order the loader maps them (data loaded in the main process)."""
    dataset = trainer.data_loader.dataset
    mapper, seen = dataset._mapper, []

    def recording(d):
        out = mapper(d)
        seen.append((d["file_name"], out["image"], out["instances"].gt_boxes.tensor))
        return out

    dataset._mapper = recording
    return seen


@pytest.mark.parametrize("spelling", ["yacs", "lazy"])
def test_trainer_state_saved_and_restored_in_process(tiny_train, tmp_path, spelling):
    """Trainer A runs iterations 0-2, checkpointing after 1; trainer B, built afresh, resumes
    from that checkpoint: after loading, its random generators, loss normaliser and loader
    position are A's after iteration 1, its iteration 2 maps the same images with the same
    augmentations, and its final weights are A's, bitwise."""
    from detectron2.engine import HookBase

    period = ["SOLVER.CHECKPOINT_PERIOD", "2"]
    lazy_period = "train.checkpointer.period=2"

    def build(out, resume):
        if spelling == "lazy":
            cfg = _lazy_cfg(out, 3, lazy_period)
            return _lazy_trainer(cfg, resume=resume)
        trainer = _yacs_trainer(out, 3, *period)
        trainer.resume_or_load(resume=resume)
        return trainer

    def train(trainer):
        if spelling == "lazy":
            trainer.train(trainer.start_iter, 3)
        else:
            trainer.train()

    class Record(HookBase):
        snapshot = None

        def after_step(self):
            if self.trainer.iter == 1:  # after the checkpointer's hook
                Record.snapshot = _snapshot(self.trainer)

    a = build(tmp_path / "a", resume=False)
    a.register_hooks([Record()])
    batches_a = _record_batches(a)
    train(a)
    # data only: tensors, numbers, strings and containers
    ckpt = torch.load(tmp_path / "a" / "model_0000001.pth", map_location="cpu", weights_only=True)
    state = ckpt["trainer"]["hooks"]["ResumeState"]
    assert state["world_size"] == 1 and state["ranks"][0]["loader"]["next"] == 4
    (tmp_path / "b").mkdir()
    torch.save(ckpt, tmp_path / "b" / "model_0000001.pth")
    (tmp_path / "b" / "last_checkpoint").write_text("model_0000001.pth")

    b = build(tmp_path / "b", resume=True)
    assert b.start_iter == 2
    b.start_iter, b.iter = 2, 1  # _snapshot: the loader's position as loaded
    _assert_snapshots_equal(_snapshot(b), Record.snapshot)
    batches_b = _record_batches(b)
    train(b)
    assert len(batches_a) == 6 and len(batches_b) == 2  # 2 images per iteration
    for (fa, ia, ba), (fb, ib, bb) in zip(batches_a[4:], batches_b):
        assert fa == fb and torch.equal(ia, ib) and torch.equal(ba, bb)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
