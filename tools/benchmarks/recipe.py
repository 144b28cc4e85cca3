"""the quickstart recipe of 0.4 vs the one before it: training steps (data loading,
forward, backward, AdamW) of EAPMTrainers built from
configs/quickstart/eapm_retinanet_0.3.yaml (the reference) and eapm_retinanet.yaml
(--recipe-config: the reference, then any number of others), on the embedded
dataset, interleaved step by step, --recipe-iters steps each after --warmup
(--recipe-opts: overrides for all); prints the step-time ratios and the
training-time ratios (step-time ratio x the ratio of the configs' SOLVER.MAX_ITER).
Not in the default set."""

from __future__ import annotations

import os
import shutil
import sys

import torch

from eapm.utils.benchmark import interleaved

from . import register

RECIPES = ("quickstart/eapm_retinanet_0.3.yaml", "quickstart/eapm_retinanet.yaml")


class _TrainerStep:
    """One training step (``run_step``: next batch of its own loader, forward, backward,
    optimizer) of an EAPMTrainer built from a repository config, inside its own event
    storage; no hooks (no lr schedule, checkpoints or logs)."""

    def __init__(self, config: str, opts):
        from detectron2.utils.env import seed_all_rng
        from detectron2.utils.events import EventStorage

        import eapm
        from eapm.engine import EAPMTrainer
        from eapm.utils.testing import get_config_file

        cfg = eapm.load_config(get_config_file(config), list(opts), training=True)
        cfg.freeze()
        seed_all_rng(cfg.SEED)  # as train_net.py (default_setup): the same start every run
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.trainer = EAPMTrainer(cfg)
        self.storage = EventStorage(0)

    def __call__(self) -> None:
        with self.storage:
            self.trainer.iter = self.storage.iter
            self.trainer.run_step()
            self.storage.iter += 1

    def close(self) -> None:
        self.trainer.close_train_loader()


@register("recipe", cpu_default=False)
def run(args, reporter) -> None:
    import tempfile

    if len(args.recipe_config) < 2:
        sys.exit("--recipe-config needs two configs or more (the first is the reference)")
    old, new = args.recipe_config[:2]
    tmp = tempfile.mkdtemp(prefix="eapm_bench_recipe_")
    steps = {}
    try:
        for i, config in enumerate(args.recipe_config):
            opts = list(args.recipe_opts) + ["OUTPUT_DIR", os.path.join(tmp, str(i))]
            steps[config] = _TrainerStep(config, opts)
        times = interleaved(steps, args.recipe_iters, args.warmup)
    finally:
        for step in steps.values():
            step.close()
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = reporter.timings(
        f"[recipe] training step (data, forward, backward, AdamW) on the embedded dataset,"
        f" {args.recipe_iters} steps each, interleaved, {torch.get_num_threads()} threads",
        times,
        old,
    )
    training = {}
    for config, ratio in ratios.items():
        training[config] = ratio * steps[config].max_iter / steps[old].max_iter
        print(
            f"  training time {config} / {old}: {training[config]:.3f}x  (step-time ratio"
            f" {ratio:.3f}x x SOLVER.MAX_ITER {steps[config].max_iter} / {steps[old].max_iter})"
        )
    reporter.results["[recipe] training time"] = {"ratio": training[new], "step_ratio": ratios[new]}
