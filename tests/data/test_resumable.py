"""eapm/data/resumable.py, the exactly resumable training loader: its index stream is
detectron2's TrainingSampler's, a state taken after any batch resumes the same batches;
augmentations depend only on the seed and the position; a process exits with the loader still
iterating. (Kill-and-resume runs of train_net.py: test_exact_resume.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO, env, kill_group, take


@pytest.mark.parametrize("world", [1, 3])
def test_index_stream_is_detectron2_training_samplers(world):
    from detectron2.data.samplers import TrainingSampler

    from eapm.data.resumable import ResumableBatchSampler

    for rank in range(world):
        ours = ResumableBatchSampler(7, 1, seed=5, rank=rank, world_size=world)
        theirs = TrainingSampler(7, shuffle=True, seed=5)
        theirs._rank, theirs._world_size = rank, world
        it = iter(theirs)
        assert [b[0][0] for b in take(iter(ours), 30)] == take(it, 30)


@pytest.mark.parametrize("buckets", [None, [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]])
def test_state_after_any_batch_resumes_the_same_batches(buckets):
    from eapm.data.resumable import ResumableBatchSampler

    def sampler():
        return ResumableBatchSampler(11, 3, seed=1, rank=1, world_size=2, bucket_of=buckets)

    full = take(iter(sampler()), 25)
    for n in (0, 4, 13):
        s = sampler()
        take(iter(s), n + 5)  # handed out beyond batch n, as a prefetching loader does
        state = s.state_after(n)
        resumed = sampler()
        resumed.load_state_dict(state)
        assert take(iter(resumed), 25 - n - 1) == full[n + 1 :]
    # every position is used once, in order, by this process (1, 3, 5, ... of the stream)
    positions = sorted(p for batch in full for _, p, _ in batch)
    assert positions == sorted(set(positions)) and all(p % 2 == 1 for p in positions)
    if buckets:
        for batch in full:
            assert len({buckets[i] for i, _, _ in batch}) == 1  # one aspect group per batch


def test_augmentations_depend_only_on_seed_and_position():
    import numpy as np

    from eapm.data.resumable import SeededMapDataset

    def mapper(d):
        return (d["id"], np.random.rand(), torch.rand(1).item(), __import__("random").random())

    ds = SeededMapDataset([{"id": i} for i in range(4)], mapper)
    a = [ds[(i, p, 9)] for i, p in ((0, 0), (1, 1), (2, 2))]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    b = [ds[(i, p, 9)] for i, p in ((2, 2), (0, 0), (1, 1))]
    assert sorted(a) == sorted(b)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generators untouched
    assert ds[(0, 0, 9)] != ds[(0, 4, 9)] != ds[(0, 0, 10)]


def test_a_process_exits_with_the_training_loader_still_iterating():
    """The loader's workers ignore SIGTERM (preemption safety); multiprocessing's exit
    handler stops daemonic children with SIGTERM and then waits for them. A script that
    exits with the loader's iterator alive must still exit (it used to hang forever)."""
    script = textwrap.dedent(
        """
        import torch
        from eapm.data.resumable import ResumableBatchSampler, _PreemptionSafeLoader, _worker_init

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, key):
                return key[0]

        loader = _PreemptionSafeLoader(
            Items(),
            batch_sampler=ResumableBatchSampler(8, 2, seed=3),
            num_workers=1,
            collate_fn=list,
            worker_init_fn=_worker_init,
        )
        it = iter(loader)
        print("batch", next(it), flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail("the process did not exit with the loader's iterator alive (hung at exit)")
    assert proc.returncode == 0, err[-2000:]
    assert out.startswith("batch ["), out
