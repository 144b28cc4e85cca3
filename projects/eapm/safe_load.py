"""Checkpoints are data: weights and training state read without running any code.

``pickle.load`` and ``torch.load`` run whatever a file asks (a ``__reduce__`` returning
``(os.system, ("...",))``), and torch 2.3's ``torch.load(weights_only=True)`` is not a
guard either: it hands a zip holding ``constants.pkl`` to ``torch.jit.load`` (TorchScript,
whose ``__setstate__`` runs) and trusts the element count a pickle claims for each storage
(it then reads past the record's buffer). So this module reads every checkpoint itself;
torch's loader and ``pickle.load`` never see the file. ``load_checkpoint_file`` reads:

* **torch's zip format** (``torch.save`` since torch 1.6; any suffix but ``.pkl``): the
  archive may hold only the records a tensor checkpoint has (``<folder>/data.pkl``,
  ``data/<key>``, ``version``, ``byteorder``, ``.data/<name>``), stored uncompressed and
  little-endian; anything else (TorchScript's ``constants.pkl``, ``code/``) is refused.
  ``data.pkl`` is read by the restricted unpickler below; each storage it names is read from
  its record, which must hold at least the bytes the pickle claims, and each tensor must lie
  inside its storage.
* **torch's legacy format** (``_use_new_zipfile_serialization=False``): magic number,
  protocol, system info, the pickle, then each storage with its element count, checked
  against the pickle's claim and the file's size.
* **``.pkl``** (detectron2's model zoo ``{"model": {name: ndarray}, "__author__": ...}``,
  Caffe2 / MSRA ``{"blobs": ...}``, torchvision weights converted by detectron2's script):
  a plain pickle read by the same unpickler, numpy arrays and containers only.

The restricted unpickler (protocols 0-5) resolves only the globals of ``ALLOWED_GLOBALS``
(an exact set), each to a function of this module that checks its arguments before numpy
or torch builds the value (arrays and dtypes without Python objects, tensors inside their
storage, no backward hooks). A call (REDUCE) reaches only those functions; the opcodes that
create instances of classes (NEWOBJ, NEWOBJ_EX, OBJ, INST) are refused; BUILD sets the
state of an ``OrderedDict`` (a ``state_dict``'s ``_metadata``), a numpy array or a numpy
dtype, never of a class or function.

Every failure to read a file is one of two errors, both naming the file:
``UnsafeCheckpointError`` (it refers to something other than data; nothing of it ran) and
``DamagedCheckpointError`` (truncated, corrupted, not a checkpoint, not a regular file).
There is no switch that turns the check off: a user who trusts a file converts it once,
explicitly (``python tools/convert_checkpoint.py --trust-source IN OUT``).

Not checked: the values (a NaN weight loads as NaN) and whether the names match a model
(detectron2's checkpointer reports that).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import stat
import struct
import zipfile
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "ALLOWED_GLOBALS",
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
    "checkpoint_format",
    "load_checkpoint_file",
]


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


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (``path``: the file; the message says why)."""

    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.path = path


class _Refused(Exception):
    """Raised inside the reader for what makes a file unsafe (``what``: the reason)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _Damaged(Exception):
    """Raised inside the reader for what makes a file unreadable."""


# ------------------------------------------------------------------ the allowed globals
try:  # numpy 2 renamed numpy.core to numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _check_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"a numpy value of dtype {_describe(dtype)}")
    if dtype.hasobject:
        raise _Refused(f"a numpy value of dtype {dtype} (Python objects)")
    return dtype


def _int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _Damaged(f"{what} {value!r:.80} is not a tuple of non-negative integers")
    return value


def _np_reconstruct(subtype, shape, code):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then sets its state
    if subtype is not np.ndarray:
        raise _Refused(f"an array of type {_describe(subtype)}")
    if math.prod(_int_tuple(shape, "array shape")) != 0 or code not in (b"b", "b"):
        raise _Damaged("an array that is not built empty first")
    return _multiarray._reconstruct(np.ndarray, shape, code)


def _np_scalar(dtype, data):
    _check_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Damaged(f"a numpy scalar of dtype {dtype} without its {dtype.itemsize} bytes")
    return _multiarray.scalar(dtype, data)


def _np_frombuffer(buf, dtype, shape, order):  # protocol 5
    _check_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _Refused(f"an array buffer of type {_describe(buf)}")
    n = math.prod(_int_tuple(shape, "array shape")) * dtype.itemsize
    if memoryview(buf).nbytes != n or order not in ("C", "F"):
        raise _Damaged(f"an array of shape {shape} whose buffer does not hold {n} bytes")
    return _numeric._frombuffer(buf, dtype, shape, order)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str) or type(align) is not bool or type(copy) is not bool:
        raise _Refused(f"numpy.dtype({spec!r:.40}, ...)")
    return _check_dtype(np.dtype(spec, align, copy))


def _bytes_from_text(text, encoding="utf-8"):  # protocol 2 pickles bytes as _codecs.encode
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode(..., {encoding!r:.40})")
    return text.encode("latin-1")


def _ordered_dict(items=()):
    if not isinstance(items, (list, tuple)):
        raise _Refused(f"OrderedDict({_describe(items)})")
    return collections.OrderedDict(items)


def _set(items=()):
    return set(_items(items))


def _frozenset(items=()):
    return frozenset(_items(items))


def _items(items):
    if not isinstance(items, (list, tuple)):
        raise _Refused(f"a set of {_describe(items)}")
    return items


def _no_hooks(hooks) -> None:
    if not isinstance(hooks, dict) or hooks:
        raise _Refused(f"tensor backward hooks {_describe(hooks)}")


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Damaged(f"a tensor on {_describe(storage)}")
    _int_tuple((offset,), "tensor offset")
    if len(_int_tuple(size, "tensor size")) != len(_int_tuple(stride, "tensor stride")):
        raise _Damaged(f"a tensor of size {size} with stride {stride}")
    if type(requires_grad) is not bool:
        raise _Damaged(f"requires_grad {requires_grad!r:.40}")
    _no_hooks(hooks)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and type(v) is bool for k, v in metadata.items())
    ):
        raise _Refused(f"tensor metadata {_describe(metadata)}")
    numel = storage._size()  # (len() warns that TypedStorage is deprecated)
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise _Damaged(
            f"a tensor of size {size}, stride {stride}, offset {offset} reaches past its storage "
            f"of {numel} elements"
        )
    args = (storage, offset, size, stride, requires_grad, collections.OrderedDict())
    return torch._utils._rebuild_tensor_v2(*args, *([metadata] if metadata else []))


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool:
        raise _Damaged("a parameter that is not a tensor")
    _no_hooks(hooks)
    return torch.nn.Parameter(data, requires_grad)


class _StorageType:
    """What the global ``torch.<Name>Storage`` of a pickle resolves to: its dtype only."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGES = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": torch.float32,
        "DoubleStorage": torch.float64,
        "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64,
        "IntStorage": torch.int32,
        "ShortStorage": torch.int16,
        "CharStorage": torch.int8,
        "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool,
        "ComplexFloatStorage": torch.complex64,
        "ComplexDoubleStorage": torch.complex128,
    }.items()
}

_NUMPY: Dict[Tuple[str, str], Any] = {}
for _module in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spell them
    _NUMPY[(f"{_module}.multiarray", "_reconstruct")] = _np_reconstruct
    _NUMPY[(f"{_module}.multiarray", "scalar")] = _np_scalar
    _NUMPY[(f"{_module}.numeric", "_frombuffer")] = _np_frombuffer
_NUMPY[("numpy", "ndarray")] = np.ndarray  # a value: only _np_reconstruct takes it
_NUMPY[("numpy", "dtype")] = _np_dtype
_CONTAINERS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("__builtin__", "set"): _set,  # protocol 0-2 pickles of Python 2
    ("__builtin__", "frozenset"): _frozenset,
    ("_codecs", "encode"): _bytes_from_text,
}
_TORCH: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage for name, storage in _STORAGES.items()},
}
_PKL_GLOBALS = {**_NUMPY, **_CONTAINERS}  # .pkl files
_TORCH_GLOBALS = {**_PKL_GLOBALS, **_TORCH}  # torch files (numpy too: resume states)

#: every global a checkpoint may name, as ``"module.name"``; nothing else is ever resolved
ALLOWED_GLOBALS: FrozenSet[str] = frozenset(f"{m}.{n}" for m, n in _TORCH_GLOBALS)


def _describe(obj) -> str:
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{'the class ' if isinstance(obj, type) else ''}{kind.__module__}.{kind.__qualname__}"


# ------------------------------------------------------------------ the unpickler
class _DataUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be replaced
    """Unpickles data only (see the module docstring). ``allowed``: global -> what it
    resolves to; ``storage``: ``persistent_load`` for torch files (``None``: refused)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed: Dict[Tuple[str, str], Any], storage=None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._callable = {
            id(v) for v in allowed.values() if not isinstance(v, (type, _StorageType))
        }
        self._storage: Optional[Callable[[Any], Any]] = storage

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"the global {module}.{name}")
        return found

    def persistent_load(self, pid):
        if self._storage is None:
            raise _Refused(f"the persistent id {pid!r:.60}")
        return self._storage(pid)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callable:
            raise _Refused(f"a call of {_describe(func)}")
        if not isinstance(args, tuple):
            raise _Damaged("a call whose arguments are not a tuple")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict:  # a state_dict's _metadata
            if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise _Damaged("an OrderedDict state that is not a dict of names")
            inst.__dict__.update(state)
        elif type(inst) is np.ndarray:
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise _Damaged("an array state that is not numpy's")
            _check_dtype(state[-3])
            if not isinstance(state[-1], (bytes, bytearray, pickle.PickleBuffer)):
                raise _Refused(f"array data of type {_describe(state[-1])}")
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype):
            inst.__setstate__(state)
            _check_dtype(inst)
        else:
            raise _Refused(f"setting the state of {_describe(inst)}")

    def load_instance(self):
        raise _Refused("an instance of a class (a NEWOBJ, OBJ or INST opcode)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST):
        dispatch[_op[0]] = load_instance


def _unpickle(data, allowed, storage=None, encoding: str = "utf-8") -> Any:
    f = data if hasattr(data, "read") else io.BytesIO(data)
    return _DataUnpickler(f, allowed, storage, encoding=encoding).load()


def _storage_claim(pid, length: int) -> Tuple[_StorageType, str, int]:
    """The (type, key, element count) of a torch storage's persistent id of ``length``."""
    if not isinstance(pid, tuple) or len(pid) != length or pid[0] != "storage":
        raise _Refused(f"the persistent id {pid!r:.60}")
    stype, key, location, numel = pid[1:5]
    if not isinstance(stype, _StorageType):
        raise _Refused(f"a storage of type {_describe(stype)}")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int:
        raise _Damaged(f"the storage id {pid!r:.80}")
    if numel < 0:
        raise _Damaged(f"storage {key} claims {numel} elements")
    return stype, key, numel


def _typed(untyped: torch.UntypedStorage, stype: _StorageType) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=stype.dtype, _internal=True)


def _read_into(f, buf: torch.Tensor, where: str) -> torch.UntypedStorage:
    """The storage of the uint8 tensor ``buf``, filled from ``f`` at its position."""
    if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
        raise _Damaged(f"{where} ends before its {buf.numel()} bytes")
    return buf.untyped_storage()


# ------------------------------------------------------------------ torch's zip format
_ZIP_MAGIC = b"PK\x03\x04"
_RECORD = re.compile(r"(data\.pkl|version|byteorder|data/[^/]+|\.data/[^/]+)")


def _zip_records(f) -> Dict[str, zipfile.ZipInfo]:
    """The records of a torch zip checkpoint, by name below its one folder; refuses any
    record a tensor checkpoint does not have."""
    infos = zipfile.ZipFile(f).infolist()
    folders = {i.filename.split("/", 1)[0] for i in infos}
    if len(folders) != 1 or not all("/" in i.filename for i in infos):
        raise _Damaged(f"the archive's records are not in one folder: {sorted(folders)[:4]}")
    records: Dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename.split("/", 1)[1]
        if not _RECORD.fullmatch(name):
            code = name in ("constants.pkl", "bytecode.pkl") or name.startswith("code/")
            raise _Refused(f"the record {info.filename!r}" + (" (TorchScript)" if code else ""))
        if name in records:
            raise _Damaged(f"the record {info.filename!r} twice")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _Damaged(f"the record {info.filename!r} is compressed")
        records[name] = info
    if "data.pkl" not in records:
        raise _Damaged("the archive has no data.pkl")
    return records


def _seek_record(f, info: zipfile.ZipInfo, size: int) -> None:
    """Moves ``f`` to the first byte of ``info``'s data (checked to lie inside the file)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != _ZIP_MAGIC:
        raise _Damaged(f"the record {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise _Damaged(f"the record {info.filename!r} runs past the end of the file")
    f.seek(start)


def _read_zip(f, size: int) -> Any:
    records = _zip_records(f)

    def record_bytes(name: str) -> bytes:
        _seek_record(f, records[name], size)
        return f.read(records[name].file_size)

    if "byteorder" in records and record_bytes("byteorder") != b"little":
        raise _Damaged("the checkpoint is not little-endian")
    storages: Dict[str, torch.UntypedStorage] = {}

    def storage(pid):
        stype, key, numel = _storage_claim(pid, 5)
        info = records.get(f"data/{key}")
        if info is None:
            raise _Damaged(f"storage {key} has no record")
        nbytes = numel * stype.itemsize
        if nbytes > info.file_size:
            raise _Damaged(
                f"storage {key} claims {numel} elements of {stype.dtype} ({nbytes} bytes), "
                f"its record holds {info.file_size} bytes"
            )
        if key not in storages:
            _seek_record(f, info, size)
            buf = torch.empty(nbytes, dtype=torch.uint8)
            storages[key] = _read_into(f, buf, f"the record of storage {key}")
        elif storages[key].nbytes() != nbytes:
            raise _Damaged(f"storage {key} is claimed with two sizes")
        return _typed(storages[key], stype)

    return _unpickle(record_bytes("data.pkl"), _TORCH_GLOBALS, storage)


# ------------------------------------------------------------------ torch's legacy format
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_legacy(f, size: int) -> Any:
    if _unpickle(f, {}) != _LEGACY_MAGIC:
        raise _Damaged("it is neither a zip nor a legacy torch file (no torch magic number)")
    if _unpickle(f, {}) != _LEGACY_PROTOCOL:
        raise _Damaged("unknown legacy torch protocol")
    info = _unpickle(f, {})
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _Damaged("the checkpoint is not little-endian")
    claims: Dict[str, Tuple[torch.Tensor, int]] = {}  # key: (its bytes, filled later; numel)

    def storage(pid):
        stype, key, numel = _storage_claim(pid, 6)
        if pid[5] is not None:
            raise _Damaged(f"storage {key} is a view (torch < 0.4)")
        nbytes = numel * stype.itemsize
        if key not in claims:
            if nbytes > size - f.tell():
                raise _Damaged(f"storage {key} claims {nbytes} bytes, more than the file holds")
            claims[key] = (torch.empty(nbytes, dtype=torch.uint8), numel)
        elif claims[key][0].numel() != nbytes:
            raise _Damaged(f"storage {key} is claimed with two sizes")
        return _typed(claims[key][0].untyped_storage(), stype)

    obj = _unpickle(f, _TORCH_GLOBALS, storage)
    keys = _unpickle(f, {})
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(claims):
        raise _Damaged("the list of storages does not match the pickle's")
    for key in keys:
        buf, numel = claims[key]
        header = f.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
            raise _Damaged(f"storage {key} does not hold the {numel} elements claimed")
        _read_into(f, buf, f"storage {key}")
    return obj


# ------------------------------------------------------------------ entry point
def checkpoint_format(path: str) -> str:
    """``"pkl"`` for detectron2 / Caffe2 pickles (``.pkl``), else ``"torch"`` (zip or
    legacy, told apart by the file's first bytes)."""
    return "pkl" if os.path.splitext(path)[1] == ".pkl" else "torch"


def _open_regular(path: str):
    """``(file, size)`` of a regular file, opened without blocking on a FIFO."""
    local = path
    if "://" in path:
        from detectron2.utils.file_io import PathManager

        local = PathManager.get_local_path(path)
    fd = os.open(local, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Damaged("it is not a regular file (a folder, FIFO or device)")
    return os.fdopen(fd, "rb", buffering=0), st.st_size  # large reads go straight in


def load_checkpoint_file(path: str) -> Any:
    """The content of the checkpoint file ``path``, read as data (see the module
    docstring): tensors on the CPU, numpy arrays, numbers, strings, bytes, ``None`` and
    containers of them.

    Raises:
        UnsafeCheckpointError: the file refers to anything else (nothing of it ran).
        DamagedCheckpointError: the file cannot be read (missing, not a regular file,
            truncated, corrupted, not a checkpoint). No other exception leaves it.
    """
    try:
        f, size = _open_regular(path)
        with f:
            if checkpoint_format(path) == "pkl":
                return _unpickle(f.read(), _PKL_GLOBALS, encoding="latin1")
            if f.read(4) == _ZIP_MAGIC:
                return _read_zip(f, size)
            f.seek(0)
            return _read_legacy(io.BytesIO(f.read()), size)
    except _Refused as e:
        raise UnsafeCheckpointError(path, e.what) from None
    except _Damaged as e:
        raise DamagedCheckpointError(path, f"checkpoint {path} cannot be read: {e}") from None
    except Exception as e:  # anything else that stops the read of untrusted bytes
        raise DamagedCheckpointError(
            path, f"checkpoint {path} cannot be read ({type(e).__name__}: {e})"
        ) from e
