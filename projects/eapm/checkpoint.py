"""Checkpoint files that a kill cannot damage, and a resume that survives a damaged one.

``EAPMCheckpointer`` is detectron2's ``DetectionCheckpointer`` with two changes:

* every file it writes (the ``.pth`` checkpoint and ``last_checkpoint``) is written to a
  temporary file beside it (``<name>.tmp.<pid>``), flushed to disk and renamed into place
  (``os.replace``, atomic on POSIX file systems). A process killed during a save leaves at
  most a stray temporary file; the previous checkpoint and ``last_checkpoint`` stay intact.
* ``resume_or_load(path, resume=True)`` that finds the last checkpoint unreadable (truncated,
  not a checkpoint, missing: ``DamagedCheckpointError``) logs a warning naming the file and
  its error, and resumes from the newest readable ``model_*.pth`` before it; with none left
  it raises
  ``DamagedCheckpointError`` naming every file it tried.
* every file is loaded as data (``eapm.safe_load``): tensors, arrays, numbers, strings and
  containers only. A file that refers to anything else raises ``UnsafeCheckpointError``
  naming the file, whether it is ``MODEL.WEIGHTS`` or the last checkpoint of a resume (a
  refused file is not "damaged": the resume does not fall back past it), and nothing in it
  runs.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List
from urllib.parse import parse_qs

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .safe_load import (
    DamagedCheckpointError,
    UnsafeCheckpointError,
    checkpoint_format,
    load_checkpoint_file,
)
from .upstream import adapted_from

__all__ = [
    "EAPMCheckpointer",
    "DamagedCheckpointError",
    "AtomicPathManager",
    "UnsafeCheckpointError",
]

logger = logging.getLogger(__name__)

_ITER_FILE = re.compile(r"^model_(\d+)\.pth$")


class _AtomicFile:
    """A writable file object that becomes ``path`` only when closed without an error."""

    def __init__(self, path: str, mode: str):
        self.path = path
        self.tmp = f"{path}.tmp.{os.getpid()}"
        self._f = open(self.tmp, mode)

    def __getattr__(self, name):  # write, tell, seek, ... of the temporary file
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class AtomicPathManager:
    """detectron2's ``PathManager`` whose ``open`` of a local file for writing returns an
    atomic file (``_AtomicFile``); every other call is ``PathManager``'s."""

    def open(self, path: str, mode: str = "r", **kwargs):
        if ("w" in mode or "x" in mode) and "://" not in path:
            return _AtomicFile(path, mode)
        return PathManager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(PathManager, name)


class EAPMCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes and a resume that falls back past a
    damaged last checkpoint (see the module docstring)."""

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = AtomicPathManager()

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        try:
            return super().load(path, *args, **kwargs)
        finally:  # detectron2 resets it only when the load succeeds
            self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        data = self._load_file_as_data(filename)  # raises the two errors of eapm.safe_load
        if not isinstance(data, dict) or "model" not in data:
            raise DamagedCheckpointError(filename, f"checkpoint {filename} holds no model")
        return data

    @adapted_from(
        DetectionCheckpointer._load_file,
        "detectron2/checkpoint/detection_checkpoint.py",
        "cc7b5046f28e8faf35ffa4fc15273140bee3b7ca",
    )
    def _load_file_as_data(self, filename: str) -> Dict[str, Any]:
        """detectron2's ``DetectionCheckpointer._load_file`` with every file read by
        ``eapm.safe_load`` instead of ``pickle`` / ``torch.load``. Adapted from
        detectron2/checkpoint/detection_checkpoint.py ``DetectionCheckpointer._load_file``
        (the formats it recognises; detectron2 offers no hook for the raw load; the
        suite notices when the pinned one changes: ``eapm.upstream``)."""
        data = load_checkpoint_file(filename)
        if not isinstance(data, dict):
            raise DamagedCheckpointError(filename, f"checkpoint {filename} holds no dict")
        if checkpoint_format(filename) == "pkl":
            if "model" in data and "__author__" in data:  # detectron2's model zoo format
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            blobs = data.get("blobs", data)  # Caffe2 / Detectron1 (ImageNet: no "blobs")
            model = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            if "model_state" not in data:
                raise DamagedCheckpointError(
                    filename, f"pycls checkpoint {filename} holds no 'model_state'"
                )
            state = data["model_state"]
            model = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            return {"model": model, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in data:  # a bare state dict (e.g. torchvision's)
            data = {"model": data}
        query = self._parsed_url_during_load.query if self._parsed_url_during_load else ""
        queries = parse_qs(query)
        if queries.pop("matching_heuristics", "False") == ["True"]:
            data["matching_heuristics"] = True
        if queries:
            raise ValueError(f"Unsupported query remaining: {queries}, in {filename}")
        return data

    def _older_checkpoints(self, last: str) -> List[str]:
        """The ``model_<iteration>.pth`` files of the save dir other than ``last``, newest
        first."""
        found = []
        for f in self.get_all_checkpoint_files():
            m = _ITER_FILE.match(os.path.basename(f))
            if m and os.path.abspath(f) != os.path.abspath(last):
                found.append((int(m.group(1)), f))
        return [f for _, f in sorted(found, reverse=True)]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        tried = []
        for candidate in [last, *self._older_checkpoints(last)]:
            try:
                if not os.path.isfile(candidate):
                    raise DamagedCheckpointError(candidate, f"checkpoint {candidate} is missing")
                checkpoint = self.load(candidate)
            except DamagedCheckpointError as e:
                logger.warning(f"{e}; trying the previous checkpoint")
                tried.append(str(e))
                continue
            if tried:
                logger.warning(
                    f"Resumed from {candidate}, not from the last checkpoint {last}, which is "
                    f"damaged: {tried[0]}"
                )
            return checkpoint
        raise DamagedCheckpointError(
            last, "no readable checkpoint to resume from:\n  " + "\n  ".join(tried)
        )
