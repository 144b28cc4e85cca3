"""eapm/engine/hooks.py, preemption and the resume state: the preemption keys are checked at
load time naming the key; a resume state saved by one number of processes is regrouped for
another and the stream continues without a gap. (Kill-and-resume runs of train_net.py:
test_exact_resume.py.)"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import REPO, take


@pytest.mark.parametrize("new_world", [1, 3])
def test_regroup_for_another_process_count_continues_the_stream(new_world):
    """A resume state of 2 processes (aspect-ratio buckets: they took different numbers of
    stream elements) loaded by ``new_world`` processes: the normalisers' mean, no bucket
    carried over, and the new processes together take the stream from the element after the
    furthest one any saved process took, each element once, without a gap."""
    from eapm.data.resumable import ResumableBatchSampler
    from eapm.engine.hooks import _regroup

    buckets = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]

    def sampler(rank, world, bucket_of=buckets):
        return ResumableBatchSampler(
            11, 2, seed=4, rank=rank, world_size=world, bucket_of=bucket_of
        )

    ranks = []
    for rank, normalizer in ((0, 10.0), (1, 30.0)):
        s = sampler(rank, 2)
        take(iter(s), 5)
        ranks.append({"loss_normalizers": {"": normalizer}, "loader": s.state_after(3)})
    saved = {"world_size": 2, "ranks": ranks}
    used = {r + j * 2 for r in (0, 1) for j in range(ranks[r]["loader"]["next"])}
    assert ranks[0]["loader"]["next"] != ranks[1]["loader"]["next"]  # buckets differ
    end = max(used) + 1

    taken = []
    for rank in range(new_world):
        normalizers, loader = _regroup(saved, new_world, rank)
        assert normalizers == {"": 20.0}
        assert loader["seed"] == 4 and loader["buckets"] == [[], []]
        s = sampler(rank, new_world, None)  # one bucket: consecutive elements form a batch
        s.load_state_dict({**loader, "buckets": [[]]})
        taken += [pos for batch in take(iter(s), 3) for _, pos, _ in batch]
    assert sorted(taken) == list(range(end, end + 6 * new_world))

    # a saved process without a resumable loader: no loader position for anyone
    ranks[1] = {**ranks[1], "loader": None}
    assert _regroup(saved, new_world, 0)[1] is None


def test_preemption_keys_validated():
    import eapm

    cfg_file = os.path.join(REPO, "configs", "quickstart", "eapm_retinanet.yaml")
    with pytest.raises(ValueError, match=r"^Invalid config SOLVER\.PREEMPTION\.SIGNALS"):
        eapm.load_config(cfg_file, ["SOLVER.PREEMPTION.SIGNALS", "['SIGKILL']"])
    with pytest.raises(ValueError, match=r"^Invalid config SOLVER\.PREEMPTION\.EXIT_CODE"):
        eapm.load_config(cfg_file, ["SOLVER.PREEMPTION.EXIT_CODE", "0"])
    with pytest.raises(ValueError, match=r"^Invalid config DATALOADER\.SAMPLER_TRAIN"):
        eapm.load_config(cfg_file, ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"])
    assert sys.modules["eapm"].load_config(cfg_file).SOLVER.PREEMPTION.EXIT_CODE == 75


def test_rng_isolated_restores_every_generator_even_on_error():
    import random

    import numpy as np
    import torch

    from eapm.engine.hooks import rng_isolated

    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with rng_isolated():
        torch.rand(100), random.random(), np.random.rand(5)
    with pytest.raises(RuntimeError, match="inside"):
        with rng_isolated():
            torch.rand(10), random.random(), np.random.rand(2)
            raise RuntimeError("inside")
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
