"""wall time of train_net.py from its start to the end of its first new iteration:
--resume from a checkpoint at iteration 20 vs a fresh start, the quickstart EAPM
RetinaNet on the embedded dataset (DATALOADER.EXACT_RESUME: the loader's
position is restored by index arithmetic, no image already used is loaded);
each run is a fresh process, interleaved with the other. Not in the default set."""

from __future__ import annotations

import os
import subprocess
import sys

from eapm.utils.benchmark import interleaved

from . import register


@register("resume", cpu_default=False)
def run(args, reporter) -> None:
    import tempfile

    from eapm.model_zoo import REPO_ROOT as repo

    tmp = tempfile.mkdtemp(prefix="eapm_bench_resume_")
    base = [
        sys.executable,
        os.path.join(repo, "train_net.py"),
        "--config-file",
        os.path.join(repo, "configs", "quickstart", "eapm_retinanet.yaml"),
    ]
    common = ["DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100000", "MODEL.DEVICE", "cpu"]

    def train_net(out: str, max_iter: int, resume: bool) -> None:
        cmd = base + (["--resume"] if resume else []) + common
        cmd += ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(max_iter)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    source = os.path.join(tmp, "source")
    train_net(source, 20, False)  # model_final.pth at iteration 19: the checkpoint to resume from
    rounds = {"n": 0}

    def fresh():
        train_net(os.path.join(tmp, f"fresh{rounds['n']}"), 1, False)  # iteration 0 only

    def resumed():
        rounds["n"] += 1
        out = os.path.join(tmp, f"resumed{rounds['n']}")
        os.makedirs(out)
        for name in ("model_final.pth", "last_checkpoint"):
            with (
                open(os.path.join(source, name), "rb") as f,
                open(os.path.join(out, name), "wb") as g,
            ):
                g.write(f.read())
        train_net(out, 21, True)  # iteration 20 only

    times = interleaved({"fresh start": fresh, "--resume": resumed}, args.repeats, 0)
    reporter.timings(
        "[resume] train_net.py start to the end of the first new iteration (quickstart EAPM "
        "RetinaNet, one process)",
        times,
        "fresh start",
    )
