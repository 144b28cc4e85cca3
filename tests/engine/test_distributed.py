"""Multi-process training on CPUs (GLOO): ``train_net.py --num-gpus 2``, two "nodes" on
loopback, and the all-reduced loss normaliser across processes.

The runs use tiny COCO-json datasets (8 train / 4 val images of 64 px) and a tiny
model, so each takes seconds; the model, trainer, launcher and evaluator are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from tests.helpers import (
    REPO,
    env,
    free_port,
    kill_group,
    make_batch,
    read_metrics,
    run_train_net,
    tail,
    tiny_cfg,
    tiny_datasets,
    tiny_opts,
    train_net_cmd,
)

CONFIG = ["--config-file", "configs/quickstart/eapm_retinanet.yaml"]
# score threshold 0: the barely trained model still makes detections, so the evaluation
# really gathers predictions from both processes
PREDICT = {"MODEL.RETINANET.SCORE_THRESH_TEST": "0.0"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny_datasets(str(tmp_path_factory.mktemp("tinycoco")))


def _check_results(out, num_val_images=4):
    results = out / "inference" / "tiny_val" / "coco_instances_results.json"
    assert results.is_file()
    preds = json.loads(results.read_text())
    # predictions of the val images of both processes, gathered on rank 0
    assert {p["image_id"] for p in preds} == set(range(1, num_val_images + 1))
    assert (out / "model_final.pth").is_file()
    assert read_metrics(str(out)), "metrics.json is empty"


@pytest.mark.slow
def test_train_net_two_processes_gloo(tiny_data, tmp_path):
    """--num-gpus 2 on a CPU machine: two GLOO processes, DDP without device_ids,
    IMS_PER_BATCH 2 = one image per process, evaluation gathered on rank 0."""
    out = tmp_path / "out"
    proc = run_train_net(
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        *CONFIG,
        *tiny_data,
        *tiny_opts(str(out), 4, str(tmp_path / "no_embedded"), **PREDICT),
    )
    assert proc.returncode == 0, tail(proc)
    _check_results(out)
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "Making batched data loader with batch_size=1" in log  # 2 images in total, 1 per process
    assert (out / "log.txt.rank1").is_file()
    assert not (tmp_path / "no_embedded").exists()


@pytest.mark.slow
def test_two_machines_on_loopback_all_reduce_normalizer(tiny_data, tmp_path):
    """--num-machines 2 --machine-rank 0/1 --num-gpus 1 --dist-url tcp://127.0.0.1:PORT,
    started concurrently, each with its own OUTPUT_DIR (as on two machines), with the
    all-reduced loss normaliser. Both exit 0; rank 0 writes the model and the results."""
    url = f"tcp://127.0.0.1:{free_port()}"
    procs, outs = [], []
    for rank in (0, 1):
        out = tmp_path / f"machine{rank}"
        outs.append(out)
        cmd = train_net_cmd(
            "--num-machines",
            "2",
            "--machine-rank",
            str(rank),
            "--num-gpus",
            "1",
            "--dist-url",
            url,
            *CONFIG,
            *tiny_data,
            *tiny_opts(
                str(out),
                4,
                str(tmp_path / "no_embedded"),
                **PREDICT,
                **{"MODEL.LOSS_NORMALIZER.TYPE": "all_reduce"},
            ),
        )
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.time() + 240
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time())))
    finally:
        for p in procs:
            if p.poll() is None:  # a rank that waits forever for a dead peer
                kill_group(p)
    for rank, (p, (so, se)) in enumerate(zip(procs, outputs)):
        assert (
            p.returncode == 0
        ), f"machine rank {rank}:\n{so[-3000:]}\n----- stderr -----\n{se[-4000:]}"
    _check_results(outs[0])
    assert "World size: 2" in (outs[0] / "log.txt").read_text()
    assert not (outs[1] / "model_final.pth").exists()  # only rank 0 writes checkpoints
    assert (outs[1] / "log.txt.rank1").is_file()
    assert not (tmp_path / "no_embedded").exists()


# ---------------------------------------------------------------------------
# the all-reduced normaliser, two GLOO processes started by detectron2's launch()
# ---------------------------------------------------------------------------
def _normaliser_worker(out_dir):
    from detectron2.modeling import build_model
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from eapm.modeling.common import dense_loss_normalizer

    torch.set_num_threads(1)
    rank, world = comm.get_rank(), comm.get_world_size()
    res = {"world": world}

    class _Stub:
        device = torch.device("cpu")

    # the function itself: the mean positive count over processes (at least 1)
    res["fn"] = dense_loss_normalizer(_Stub(), [3, 10][rank], "all_reduce")
    res["fn_zero"] = dense_loss_normalizer(_Stub(), 0, "all_reduce")

    # in the model: a different number of boxes (so of positive anchors) per process
    torch.manual_seed(0)
    # one image per process: no BatchNorm in the head (the 1x1 top level would have 1 value)
    cfg = tiny_cfg(
        "quickstart/eapm_retinanet.yaml",
        "MODEL.LOSS_NORMALIZER.TYPE",
        "all_reduce",
        "MODEL.RETINANET.NORM",
        "",
    )
    model = build_model(cfg)
    batch = make_batch(num_images=1, num_boxes=(1 + 4 * rank,), seed=10 + rank)
    with EventStorage(0) as s:
        losses = model(batch)
        res["num_pos"] = s.history("num_pos_anchors").latest()  # per image; one image
    model.loss_normalizer_type = "ema"  # same model, same batch: detectron2's per-process EMA
    with EventStorage(0):
        ema_losses = model(batch)
    res["loss"] = {k: float(v) for k, v in losses.items()}
    res["ema_loss"] = {k: float(v) for k, v in ema_losses.items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.mark.slow
def test_all_reduce_normalizer_is_mean_positive_count_across_processes(tmp_path):
    from detectron2.engine import launch

    launch(_normaliser_worker, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in res] == [2, 2]
    assert [r["fn"] for r in res] == [6.5, 6.5]  # (3 + 10) / 2 on both processes
    assert [r["fn_zero"] for r in res] == [1.0, 1.0]  # no positives anywhere: 1, not 0
    pos = [r["num_pos"] for r in res]
    assert pos[0] != pos[1] and min(pos) > 0  # the processes really see different counts
    mean_pos = sum(pos) / 2
    for r, n in zip(res, pos):
        # all_reduce: loss_sum / mean_pos; ema (first iteration): loss_sum / (0.9 * 100 + 0.1 * n)
        ema_norm = 0.9 * 100 + 0.1 * n
        for k in ("loss_cls", "loss_box_reg"):
            assert r["loss"][k] * mean_pos == pytest.approx(
                r["ema_loss"][k] * ema_norm, rel=1e-4
            ), (k, r)
