"""A training data loader whose position is a small, saveable state.

detectron2's training loader is an infinite stream whose position lives in its sampler's
generator, its data-loader workers' aspect-ratio buckets and their random number
generators: a resumed run starts the stream again from the seed. Here the batches are
formed in the main process from indices alone, so the whole position is

    {"seed", "next", "buckets"}

(``next``: how many elements of this process's index stream were taken; ``buckets``: the
elements waiting in the aspect-ratio buckets, as ``(dataset index, stream position)``),
and a resumed loader continues at the exact sample where the saved one stopped, by index
arithmetic, without loading any image it already used.

* The index stream is detectron2's ``TrainingSampler``'s: one shuffled permutation of the
  dataset after another (``torch.randperm`` with a generator seeded once), and process
  ``rank`` of ``world_size`` takes the elements ``rank, rank + world_size, ...``.
* Aspect-ratio grouping (DATALOADER.ASPECT_RATIO_GROUPING) uses detectron2's rule, width >
  height or not, on the dataset dicts' ``width`` / ``height``.
* The random augmentations of a sample (the mapper's flips, crops, ...) are seeded from
  (the loader seed, the sample's stream position), so they do not depend on which worker
  loads the sample, on the number of workers, or on what was loaded before.
* Data-loader workers ignore the preemption signals (the main process handles them),
  also while they start.

The state after every batch handed out is kept until the trainer asks for it
(``state_after(n)``): the workers prefetch, so the sampler runs ahead of training.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import random
import signal
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm

__all__ = ["ResumableBatchSampler", "SeededMapDataset", "build_resumable_train_loader"]

# (dataset index, position in the global stream, loader seed)
Key = Tuple[int, int, int]


class ResumableBatchSampler:
    """Infinite batches of ``(dataset index, stream position, seed)`` keys for one process.

    Args:
        size: number of dataset items (> 0).
        batch_size: items per batch of this process (> 0).
        seed: seed of the shuffle, the same on every process.
        rank, world_size: this process and the number of processes.
        bucket_of: bucket id (0 or 1) of every dataset item for aspect-ratio grouping, or
            None (one bucket: consecutive elements form a batch).
        shuffle: shuffle each pass over the dataset (else 0, 1, 2, ... repeatedly).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        bucket_of: Optional[Sequence[int]] = None,
        shuffle: bool = True,
    ):
        if size <= 0 or batch_size <= 0:
            raise ValueError(f"size and batch_size must be > 0, got {size}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.batch_size = int(size), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.bucket_of = list(bucket_of) if bucket_of is not None else None
        self.shuffle = shuffle
        num_buckets = 1 + max(self.bucket_of or [0])
        self._state = {"seed": int(seed), "next": 0, "buckets": [[] for _ in range(num_buckets)]}
        self._perms: Dict[int, List[int]] = {}
        self._gen = None  # (generator, number of permutations drawn from it)
        self._history: Dict[int, dict] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The position where a new iteration of this sampler starts (a deep copy)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict`` or ``state_after``) at the next
        ``iter()``."""
        if len(state["buckets"]) != len(self._state["buckets"]):
            raise ValueError(
                f"the saved loader state has {len(state['buckets'])} aspect-ratio buckets, this "
                f"loader {len(self._state['buckets'])} (DATALOADER.ASPECT_RATIO_GROUPING changed?)"
            )
        if state["seed"] != self._state["seed"]:
            self._perms, self._gen = {}, None
        self._state = copy.deepcopy(state)

    def state_after(self, n: int) -> dict:
        """The position right after the ``n``-th batch (0-based) handed out by the current
        iteration; forgets the positions of the batches before it."""
        if n not in self._history:
            raise KeyError(f"no loader state after batch {n} (handed out: {sorted(self._history)})")
        for k in [k for k in self._history if k < n]:
            del self._history[k]
        return copy.deepcopy(self._history[n])

    # ----------------------------------------------------------- the stream
    def _perm(self, epoch: int) -> List[int]:
        """The ``epoch``-th pass over the dataset (detectron2's TrainingSampler order)."""
        if epoch not in self._perms:
            if not self.shuffle:
                return list(range(self.size))
            if self._gen is None or self._gen[1] > epoch:
                g = torch.Generator()
                g.manual_seed(self._state["seed"])
                self._gen = (g, 0)
            g, drawn = self._gen
            while drawn <= epoch:
                perm = torch.randperm(self.size, generator=g).tolist()
                drawn += 1
            self._gen = (g, drawn)
            self._perms = {epoch: perm}  # the stream only moves forward: keep one
        return self._perms[epoch]

    def index_at(self, position: int) -> int:
        """The dataset index at ``position`` of the global stream (all processes)."""
        epoch, offset = divmod(position, self.size)
        return self._perm(epoch)[offset]

    def __iter__(self) -> Iterator[List[Key]]:
        state = copy.deepcopy(self._state)
        self._history = {}
        n = 0
        while True:
            j = state["next"]
            state["next"] = j + 1
            position = self.rank + j * self.world_size
            idx = self.index_at(position)
            bucket = state["buckets"][self.bucket_of[idx] if self.bucket_of else 0]
            bucket.append([idx, position])
            if len(bucket) == self.batch_size:
                batch = [(idx, pos, state["seed"]) for idx, pos in bucket]
                bucket.clear()
                self._history[n] = copy.deepcopy(state)
                if len(self._history) > 4096:  # nobody asks: keep it bounded
                    del self._history[min(self._history)]
                n += 1
                yield batch


@contextlib.contextmanager
def _seeded_rngs(seed: int, position: int):
    """Python's, NumPy's and torch's global generators seeded from (seed, position) inside
    the block, and restored after it."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    s = np.random.SeedSequence([seed, position]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededMapDataset(torch.utils.data.Dataset):
    """``mapper(dicts[index])`` for an ``(index, stream position, seed)`` key, with the
    global random generators seeded from (seed, position) during the call."""

    def __init__(self, dicts: List[dict], mapper):
        self._dicts = DatasetFromList(dicts, copy=True)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, key: Key):
        idx, position, seed = key
        with _seeded_rngs(seed, position):
            out = self._mapper(self._dicts[idx])
        if out is None:
            raise ValueError(f"the dataset mapper returned None for training item {idx}")
        return out


# signals the training loader's workers ignore: the main process decides when to stop
_WORKER_IGNORED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_init(worker_id: int) -> None:
    # started with these signals blocked (see _PreemptionSafeLoader): ignore them, which
    # also discards one already pending, then unblock
    for sig in _WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_IGNORED)


# the live multi-process iterators of _PreemptionSafeLoader, shut down at interpreter exit
_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _shut_down_live_iterators() -> None:
    """At exit, before multiprocessing's own exit handler (atexit runs the handlers
    registered later first): that handler stops daemonic children with SIGTERM, which these
    workers ignore, and then waits for them forever. The iterator's own shutdown asks the
    workers to finish and joins them."""
    for it in list(_LIVE_ITERATORS):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


atexit.register(_shut_down_live_iterators)


class _PreemptionSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes never die of a preemption signal: they are
    started with the signals blocked (the mask is inherited, also by spawned workers
    that take seconds to import torch), and ``_worker_init`` ignores them. The main
    process gets a signal that arrives meanwhile as soon as the workers are started.
    The workers must be shut down by the loader (the trainer does, and an exit handler
    does for iterators still alive when the interpreter exits), not by SIGTERM."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_IGNORED)
        try:
            it = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _LIVE_ITERATORS.add(it)
        return it


def _train_loader_from_config(cfg, mapper=None):
    """``build_resumable_train_loader``'s arguments from a yacs config: DATASETS.TRAIN (with
    DATALOADER.FILTER_EMPTY_ANNOTATIONS, keypoints and proposals as detectron2's loader),
    detectron2's ``DatasetMapper(cfg, True)`` unless ``mapper`` is given,
    SOLVER.IMS_PER_BATCH, DATALOADER.ASPECT_RATIO_GROUPING and DATALOADER.NUM_WORKERS.
    (DATALOADER.SAMPLER_TRAIN must be "TrainingSampler", the order this loader implements:
    ``eapm.validate_config`` checks.)"""
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return {
        "dataset": dataset,
        "mapper": mapper if mapper is not None else DatasetMapper(cfg, True),
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
    }


@configurable(from_config=_train_loader_from_config)
def build_resumable_train_loader(
    dataset: List[dict],
    *,
    mapper,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    seed: Optional[int] = None,
) -> torch.utils.data.DataLoader:
    """The exactly resumable training loader, called as detectron2's
    ``build_detection_train_loader``: ``build_resumable_train_loader(cfg, mapper=None)`` for
    a yacs config (``_train_loader_from_config``), or with explicit arguments (a LazyConfig's
    ``dataloader.train``).

    Args:
        dataset: the training dataset dicts (a list, e.g. ``get_detection_dataset_dicts``);
            with ``aspect_ratio_grouping`` each needs its ``width`` and ``height``.
        mapper: dataset dict -> model input dict (e.g. ``DatasetMapper``), called with the
            global random generators seeded from (seed, stream position).
        total_batch_size: images per iteration over all processes (a multiple of their number).
        aspect_ratio_grouping: batches of images that are all wider than high, or all not.
        num_workers: data-loader worker processes (0: batches made in the main process);
            the batches are the same for any number.
        seed: the shuffle's seed (None: ``comm.shared_random_seed()``, drawn from the
            seeded global NumPy generator, as detectron2's TrainingSampler).

    Returns an infinite DataLoader of lists of mapped dicts, one list of
    ``total_batch_size / world size`` per iteration of this process; its ``batch_sampler`` is
    the ``ResumableBatchSampler`` that holds its position.

    Raises ``ValueError`` when ``total_batch_size`` is not a positive multiple of the number
    of processes, or an image lacks its size with ``aspect_ratio_grouping``; ``TypeError``
    when ``dataset`` is not a list."""
    if not isinstance(dataset, list):
        raise TypeError(f"dataset must be a list of dataset dicts, got {type(dataset).__name__}")
    world, rank = comm.get_world_size(), comm.get_rank()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(
            f"total_batch_size ({total_batch_size}) must be a positive multiple of the number of "
            f"processes ({world})"
        )
    bucket_of = None
    if aspect_ratio_grouping:
        missing = [d.get("file_name") for d in dataset if "width" not in d or "height" not in d]
        if missing:
            raise ValueError(
                f"aspect-ratio grouping (DATALOADER.ASPECT_RATIO_GROUPING) needs the 'width' and "
                f"'height' of every training image; {missing[0]} (and {len(missing) - 1} more) "
                "has none"
            )
        bucket_of = [0 if d["width"] > d["height"] else 1 for d in dataset]
    if seed is None:
        seed = comm.shared_random_seed()  # from the seeded global RNG, as TrainingSampler
    batch_size = total_batch_size // world
    # detectron2's wording, so that logs read the same with either loader
    logging.getLogger(__name__).info(
        f"Making batched data loader with batch_size={batch_size} (exactly resumable: "
        f"{len(dataset)} images, seed {seed}, aspect-ratio grouping "
        f"{'on' if bucket_of else 'off'}, {num_workers} workers)"
    )
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world,
        bucket_of=bucket_of,
    )
    generator = torch.Generator()  # the loader's own: creating it draws nothing globally
    generator.manual_seed(seed)
    return _PreemptionSafeLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=_worker_init,
        generator=generator,
    )
