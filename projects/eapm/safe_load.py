"""Checkpoints are data: loading weights and training state without running any code.

A pickle file can name any importable callable and have it called while it is read (a
``__reduce__`` that returns ``(os.system, ("...",))``), so ``torch.load`` without
``weights_only`` and ``pickle.load`` run whatever a downloaded ``.pth`` / ``.pkl`` asks.
Every load of this project goes through ``load_checkpoint_file``, which accepts tensors,
numpy arrays, numbers, strings, bytes, ``None`` and containers of them, and nothing else:

* ``.pth`` / ``.pyth`` (and any other suffix): ``torch.load(weights_only=True)``. Files
  written by earlier versions of this project hold the numpy random generator's state (a
  numpy array) in their resume state, which ``weights_only`` refuses; for those alone the
  file is read again by torch with the restricted unpickler below, whose allow-list is
  torch's ``weights_only`` list plus numpy arrays.
* ``.pkl`` (detectron2's model zoo format ``{"model": {name: ndarray}, "__author__": ...}``,
  Caffe2 / MSRA ImageNet weights ``{"blobs": {...}}``, torchvision weights converted by
  detectron2's script): a restricted unpickler that allows numpy arrays, numpy scalars,
  dtypes and plain containers.

A refused file raises ``UnsafeCheckpointError`` naming the file and the global it refers
to, before that global is imported or called. There is no switch that turns the check
off: a user who trusts a file converts it once, explicitly
(``python tools/convert_checkpoint.py --trust-source IN OUT``), into a file of tensors.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Dict, FrozenSet, Tuple

import torch

__all__ = [
    "UnsafeCheckpointError",
    "load_checkpoint_file",
    "load_pkl",
    "load_torch",
    "checkpoint_format",
]

# numpy arrays, scalars and dtypes as numpy 1.x and 2.x pickle them, and the helper that
# protocol-2 pickles of Python 3 use for bytes; all of them only build values
_NUMPY_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
# plain containers
_CONTAINER_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
    }
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that refers to something other than tensors, arrays, numbers, strings
    and containers (``path``: the file; ``refused``: what it refers to). Nothing of the file
    was run."""

    def __init__(self, path: str, refused: str):
        super().__init__(
            f"checkpoint {path} was refused: it refers to {refused}, and a checkpoint may hold "
            "only tensors, arrays, numbers, strings and containers (loading it could run code). "
            "If you trust its source, convert it once with "
            "'python tools/convert_checkpoint.py --trust-source IN OUT'"
        )
        self.path = path
        self.refused = refused


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"the global {module}.{name}")
        self.what = f"the global {module}.{name}"


def _torch_allowed() -> Dict[str, Any]:
    from torch import _weights_only_unpickler

    return _weights_only_unpickler._get_allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` resolves only the allowed globals; any other raises
    ``_Refused`` before the module is imported."""

    allowed: FrozenSet[Tuple[str, str]] = _NUMPY_GLOBALS | _CONTAINER_GLOBALS
    allow_torch: bool = False

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if self.allow_torch:
            found = _torch_allowed().get(f"{module}.{name}")
            if found is not None:
                return found
        raise _Refused(module, name)


class _TorchRestrictedUnpickler(_RestrictedUnpickler):
    allow_torch = True


class _TorchPickleModule:
    """What ``torch.load(pickle_module=...)`` needs of a pickle module: torch subclasses its
    ``Unpickler`` (and keeps our ``find_class`` for every global that is not a storage)."""

    Unpickler = _TorchRestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f, **kwargs):  # torch's legacy (non-zip) format
        return _TorchRestrictedUnpickler(f, **kwargs).load()


def load_pkl(path: str) -> Any:
    """The object pickled in ``path`` (read as latin-1, as detectron2 reads its ``.pkl``
    files), if it is made of numpy arrays / scalars, plain values and containers only.

    Raises:
        UnsafeCheckpointError: the file refers to anything else (nothing of it ran).
        pickle.UnpicklingError, EOFError, OSError: the file is damaged or unreadable.
    """
    from detectron2.utils.file_io import PathManager

    with PathManager.open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise UnsafeCheckpointError(path, e.what) from None


# torch's weights_only message names the refused class or global after one of these
_TORCH_REFUSALS = ("Unsupported class ", "Unsupported global: GLOBAL ")


def _torch_refusal(error: pickle.UnpicklingError) -> str:
    """The global that torch's ``weights_only`` unpickler refused, or "" when the error is
    of another kind (a damaged file)."""
    msg = str(error)
    for marker in _TORCH_REFUSALS:
        at = msg.find(marker)
        if at >= 0:
            return msg[at + len(marker) :].split()[0].rstrip(".")
    return ""


def load_torch(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, loaded on the CPU with
    ``torch.load(weights_only=True)``; a file that needs numpy arrays besides (the resume
    state of this project's versions before 0.5) is read with the restricted unpickler.

    Raises:
        UnsafeCheckpointError: the file refers to anything else (nothing of it ran).
        RuntimeError, pickle.UnpicklingError, EOFError, OSError: damaged or unreadable.
    """
    from detectron2.utils.file_io import PathManager

    with PathManager.open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _torch_refusal(e)
        if not refused:
            raise
        module, _, name = refused.rpartition(".")
        if (module, name) not in _NUMPY_GLOBALS:
            raise UnsafeCheckpointError(path, f"the global {refused}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", pickle_module=_TorchPickleModule)
    except _Refused as e:
        raise UnsafeCheckpointError(path, e.what) from None


def checkpoint_format(path: str) -> str:
    """``"pkl"`` for detectron2 / Caffe2 pickles (``.pkl``), else ``"torch"``."""
    return "pkl" if os.path.splitext(path)[1] == ".pkl" else "torch"


def load_checkpoint_file(path: str) -> Any:
    """The raw content of a checkpoint file, loaded as data (see the module docstring):
    ``load_pkl`` for ``.pkl`` files, ``load_torch`` for every other one."""
    return load_pkl(path) if checkpoint_format(path) == "pkl" else load_torch(path)
