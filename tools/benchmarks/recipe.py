"""the quickstart recipe vs the one before it: training steps (data loading,
forward, backward, AdamW) of EAPMTrainers built from
configs/quickstart/eapm_retinanet_0.5.yaml (the reference) and eapm_retinanet.yaml
(--recipe-config: the reference, then any number of others), on the embedded
dataset, interleaved step by step, --recipe-iters steps each after --warmup
(--recipe-opts: overrides for all); prints the step-time ratios and the
training-time ratios (step-time ratio x the ratio of the configs' SOLVER.MAX_ITER).
--recipe-train: instead, trains every config in full (its schedule, detectron2's
hooks), the configs' iterations interleaved one by one, then evaluates each: prints
each recipe's training time, AP and AP50 side by side, and the training-time ratios.
Not in the default set."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

import torch

from eapm.utils.benchmark import interleaved

from . import register

RECIPES = ("quickstart/eapm_retinanet_0.5.yaml", "quickstart/eapm_retinanet.yaml")


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


class _Training:
    """A whole training of an EAPMTrainer built from a repository config, one iteration per
    call (``step``), with detectron2's hooks (lr schedule, checkpoints, writers) around each
    as ``TrainerBase.train`` calls them, inside the trainer's own event storage; ``finish``
    runs the hooks' ``after_train`` (the final evaluation) and returns the results."""

    def __init__(self, config: str, opts):
        from detectron2.utils.env import seed_all_rng
        from detectron2.utils.events import EventStorage

        import eapm
        from eapm.engine import EAPMTrainer
        from eapm.utils.testing import get_config_file

        cfg = eapm.load_config(get_config_file(config), list(opts), training=True)
        cfg.freeze()
        seed_all_rng(cfg.SEED)  # as train_net.py (default_setup)
        self.trainer = EAPMTrainer(cfg)
        self.trainer.resume_or_load(resume=False)
        self.max_iter = self.trainer.max_iter
        self.trainer.iter = self.trainer.start_iter = 0
        self.storage = self.trainer.storage = EventStorage(0)
        with self.storage:
            self.trainer.before_train()
        self.next_iter = 0

    def step(self) -> None:
        t = self.trainer
        with self.storage:  # this trainer's storage is the current one during its step
            t.iter = self.next_iter
            t.before_step()
            t.run_step()
            t.after_step()
        self.next_iter += 1

    def finish(self) -> dict:
        t = self.trainer
        with self.storage:
            t.iter = self.max_iter  # as after the loop of TrainerBase.train
            t.after_train()
        return getattr(t, "_last_eval_results", None) or {}


def _interleaved_trainings(trainings, clock=time.perf_counter):
    """Steps every training to its end, one iteration of each in turn (round ``r`` starts
    at the ``r % n``-th training that has iterations left, as ``interleaved`` rotates);
    returns ``{name: [seconds of each of its iterations]}``."""
    times = {k: [] for k in trainings}
    r = 0
    while True:
        live = [k for k, tr in trainings.items() if tr.next_iter < tr.max_iter]
        if not live:
            return times
        for k in live[r % len(live) :] + live[: r % len(live)]:
            t0 = clock()
            trainings[k].step()
            times[k].append(clock() - t0)
        r += 1


def _bbox(results: dict) -> dict:
    """The bbox metrics of detectron2's results (``{dataset: {"bbox": {...}}}`` for several
    test sets, ``{"bbox": {...}}`` for one): those of the first test set."""
    if "bbox" in results:
        return results["bbox"]
    for value in results.values():
        if isinstance(value, dict) and "bbox" in value:
            return value["bbox"]
    return {}


def run_trainings(args, reporter, tmp: str) -> None:
    """--recipe-train: every config trained in full, interleaved, then evaluated."""
    configs = args.recipe_config
    old = configs[0]
    trainings = {}
    for i, config in enumerate(configs):
        opts = list(args.recipe_opts) + ["OUTPUT_DIR", os.path.join(tmp, str(i))]
        trainings[config] = _Training(config, opts)
    t0 = time.perf_counter()
    times = _interleaved_trainings(trainings)
    wall = time.perf_counter() - t0
    results, eval_s = {}, {}
    mean_mf = {}  # EAPM focal loss's MF over all examples, averaged over the iterations
    for config, tr in trainings.items():
        history = tr.storage.histories().get("eapm/cls_mf")
        if history is not None and history.values():
            mean_mf[config] = statistics.fmean(v for v, _ in history.values())
        t1 = time.perf_counter()
        results[config] = _bbox(tr.finish())
        eval_s[config] = time.perf_counter() - t1
        tr.trainer.close_train_loader()
    threads = torch.get_num_threads()
    print(
        f"\n## [recipe] whole trainings on the embedded dataset, iterations interleaved one by"
        f" one ({wall:.0f} s in all), {threads} threads; then evaluation on the test set"
    )
    train_s = {k: sum(v) for k, v in times.items()}
    report = {}
    for config in configs:
        m = results[config]
        ap, ap50 = m.get("AP", float("nan")), m.get("AP50", float("nan"))
        ratio = train_s[config] / train_s[old]
        print(
            f"  {config:48s} {len(times[config]):5d} it  training {train_s[config]:7.1f} s"
            f" ({1000 * statistics.median(times[config]):.1f} ms/it median)  AP {ap:.4f}"
            f"  AP50 {ap50:.4f}  (evaluation {eval_s[config]:.1f} s)"
            + (f"  mean MF {mean_mf[config]:.4f}" if config in mean_mf else "")
        )
        report[config] = {"iters": len(times[config]), "train_s": train_s[config],
                          "eval_s": eval_s[config], "AP": ap, "AP50": ap50,
                          "train_ratio": ratio, "mean_mf": mean_mf.get(config)}  # fmt: skip
    for config in configs[1:]:
        r = report[config]
        print(
            f"  training time {config} / {old}: {r['train_ratio']:.3f}x;"
            f" AP {r['AP']:.4f} vs {report[old]['AP']:.4f} ({r['AP'] - report[old]['AP']:+.4f})"
        )
    reporter.results["[recipe] whole trainings"] = report


@register("recipe", cpu_default=False)
def run(args, reporter) -> None:
    import tempfile

    if len(args.recipe_config) < 2:
        sys.exit("--recipe-config needs two configs or more (the first is the reference)")
    old, new = args.recipe_config[:2]
    tmp = tempfile.mkdtemp(prefix="eapm_bench_recipe_")
    if args.recipe_train:
        try:
            run_trainings(args, reporter, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
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
