"""eapm/safe_load.py under attack: a table of payloads x pickle protocols x file formats (and
the files ``torch.save`` writes), each refused with nothing run, naming the file and the global;
TorchScript archives; the allow-list pinned; over-claimed storages; genuine files of every
protocol and kind (detectron2, Caffe2 / MSRA, torchvision, own checkpoints with NumPy state)
load; damaged and randomly corrupted files fail only with the two named errors; what is not a
regular file; no module of the project that reads a file with pickle or torch.load but through
the guards."""

from __future__ import annotations

import collections
import copyreg
import importlib
import io
import os
import pickle
import random
import re
import subprocess
import zipfile
from typing import Callable, Dict

import numpy as np
import pytest
import torch

from eapm.safe_load import (
    ALLOWED_GLOBALS,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from tests.helpers import REPO, Call, RunsCommand, write_torchscript

PROTOCOLS = range(0, pickle.HIGHEST_PROTOCOL + 1)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _payloads(marker: str, tmp_path) -> Dict[str, object]:
    """Objects whose unpickling would create ``marker`` (or import a module that does)."""
    module = f"eapm_payload_{abs(hash(marker))}"
    (tmp_path / f"{module}.py").write_text(f"open({marker!r}, 'w').close()\n")
    touch = f"open({marker!r}, 'w').close()"
    system = Call(os.system, f"touch {marker}")
    return {
        "os.system": system,
        "eval": Call(eval, touch),
        "exec": Call(exec, touch),
        "getattr": Call(Call(getattr, Call(__import__, "os"), "system"), f"touch {marker}"),
        "subprocess.Popen": Call(subprocess.Popen, ["touch", marker]),
        "importlib.import_module": Call(importlib.import_module, module),
        "copyreg": Call(copyreg._reconstructor, subprocess.Popen, object, ["touch", marker]),
        "object array": np.array([system, 1], dtype=object),
    }


# what each payload is refused at: the first global its pickle names (protocols 0-2 name
# some modules as Python 2 did: __builtin__.eval, commands.Popen), or the object dtype
REFUSED_AT = {
    "os.system": "the global posix.system",
    "eval": ".eval",
    "exec": ".exec",
    "getattr": ".getattr",
    "subprocess.Popen": ".Popen",
    "importlib.import_module": "the global importlib.import_module",
    "copyreg": "._reconstructor",
    "object array": "a numpy value of dtype object",
}


def as_pkl(payload: bytes, protocol: int) -> bytes:
    return payload


def as_zip(payload: bytes, protocol: int) -> bytes:
    """A torch zip checkpoint whose data.pkl is ``payload`` (as torch.save lays it out)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    return out.getvalue()


def as_legacy(payload: bytes, protocol: int) -> bytes:
    """A legacy torch checkpoint (``_use_new_zipfile_serialization=False``) around it."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    head = b"".join(pickle.dumps(x, protocol) for x in (_LEGACY_MAGIC, 1001, info))
    return head + payload + pickle.dumps([], protocol)


FORMATS: Dict[str, Callable[[bytes, int], bytes]] = {
    "evil.pkl": as_pkl,
    "evil.pth": as_zip,
    "evil_legacy.pth": as_legacy,
    "evil.pyth": as_zip,
    "evil.bin": as_legacy,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", REFUSED_AT)
def test_payload_table_is_refused_in_every_protocol_and_format(tmp_path, monkeypatch, name, fmt):
    monkeypatch.syspath_prepend(str(tmp_path))  # the import payload's module is importable
    marker = str(tmp_path / "marker")
    payload = _payloads(marker, tmp_path)[name]
    for protocol in PROTOCOLS:
        data = {"model": {"w": np.ones(2, np.float32)}, "__author__": "x", "x": payload}
        path = str(tmp_path / f"p{protocol}_{fmt}")
        with open(path, "wb") as f:
            f.write(FORMATS[fmt](pickle.dumps(data, protocol), protocol))
        with pytest.raises(UnsafeCheckpointError) as e:
            load_checkpoint_file(path)
        assert e.value.path == path and path in str(e.value)
        assert REFUSED_AT[name] in e.value.refused, (protocol, e.value.refused)
        if REFUSED_AT[name].startswith("the global "):  # named in full in every protocol
            assert e.value.refused == REFUSED_AT[name], (protocol, e.value.refused)
        assert not os.path.exists(marker), (name, fmt, protocol)


@pytest.mark.parametrize("name", REFUSED_AT)
@pytest.mark.parametrize("legacy", [False, True])
def test_payloads_written_by_torch_save_beside_tensors_are_refused(tmp_path, name, legacy):
    marker = str(tmp_path / "marker")
    payload = _payloads(marker, tmp_path)[name]
    for protocol in (2, 3, 4, 5):
        for suffix in (".pth", ".pyth"):
            path = str(tmp_path / f"evil{protocol}{suffix}")
            torch.save(
                {"model": {"w": torch.ones(3)}, "x": payload},
                path,
                pickle_protocol=protocol,
                _use_new_zipfile_serialization=not legacy,
            )
            with pytest.raises(UnsafeCheckpointError, match=re.escape(REFUSED_AT[name])) as e:
                load_checkpoint_file(path)
            assert e.value.path == path and path in str(e.value)
            if REFUSED_AT[name].startswith("the global "):
                assert e.value.refused == REFUSED_AT[name], (protocol, e.value.refused)
            assert not os.path.exists(marker)


def _build_on(module: str, name: str, protocol: int) -> bytes:
    """A pickle that resolves the global ``module.name`` and applies BUILD to it with the
    state ``{"patched": 1}`` (setattr on a class or function, were it allowed)."""
    body = f"c{module}\n{name}\n(dS'patched'\nI1\nsb.".encode()
    return (bytes([0x80, protocol]) if protocol >= 2 else b"") + body


@pytest.mark.parametrize(
    "glob",
    [
        "collections OrderedDict",
        "numpy ndarray",
        "numpy dtype",
        "torch FloatStorage",
        "torch._utils _rebuild_tensor_v2",
        "numpy.core.multiarray _reconstruct",
    ],
)
def test_build_is_never_applied_to_an_allowed_global(tmp_path, glob):
    module, name = glob.split()
    for protocol in PROTOCOLS:
        for fmt, wrap in FORMATS.items():
            path = str(tmp_path / f"build{protocol}_{fmt}")
            with open(path, "wb") as f:
                f.write(wrap(_build_on(module, name, protocol), protocol))
            torch_global_in_pkl = module.startswith("torch") and fmt.endswith(".pkl")
            expected = "the global torch" if torch_global_in_pkl else "setting the state of"
            with pytest.raises(UnsafeCheckpointError, match=expected):
                load_checkpoint_file(path)
    assert not hasattr(np.ndarray, "patched") and not hasattr(collections.OrderedDict, "patched")


@pytest.mark.parametrize("suffix", [".pth", ".pyth", ".bin", ".pt"])
def test_a_torchscript_archive_is_refused_and_runs_nothing(tmp_path, suffix):
    marker = str(tmp_path / "marker")
    open(marker, "w").close()
    path = write_torchscript(str(tmp_path / f"ts{suffix}"), marker)
    with pytest.raises(UnsafeCheckpointError, match="TorchScript") as e:
        load_checkpoint_file(path)
    assert e.value.path == path
    assert not os.path.exists(marker)


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6),
    reason="torch >= 2.6 no longer hands TorchScript archives to torch.jit.load",
)
def test_the_torchscript_payload_is_live_for_torch_load(tmp_path):
    # the control: the file above is a real attack on torch 2.3's weights_only loader
    marker = str(tmp_path / "marker")
    open(marker, "w").close()
    path = write_torchscript(str(tmp_path / "ts.pth"), marker)
    try:
        torch.load(path, weights_only=True)
    except Exception:
        pass
    assert os.path.exists(marker)


def _rewrite_zip(path: str, change: Callable[[str, bytes], bytes]) -> None:
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, change(i.filename, z.read(i))) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, data)


def test_a_storage_that_claims_more_than_its_record_is_refused(tmp_path):
    path = str(tmp_path / "overclaim.pth")
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    _rewrite_zip(path, lambda name, data: data[:12] if name.endswith("data/0") else data)
    with pytest.raises(DamagedCheckpointError, match="claims 1000 elements .* holds 12 bytes"):
        load_checkpoint_file(path)


def test_a_legacy_storage_that_claims_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "overclaim_legacy.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(DamagedCheckpointError, match=str(path)):
        load_checkpoint_file(str(path))


def test_a_tensor_beyond_its_storage_is_refused(tmp_path):
    path = str(tmp_path / "beyond.pth")
    torch.save({"w": torch.ones(4)}, path)  # a view of 4 elements; now claim 8
    swap = b"K\x04\x85", b"K\x08\x85"  # the size tuple (4,) -> (8,): BININT1 4, TUPLE1
    _rewrite_zip(path, lambda name, data: data.replace(*swap) if "data.pkl" in name else data)
    with pytest.raises(DamagedCheckpointError, match="reaches past its storage"):
        load_checkpoint_file(path)


def test_the_allow_list_is_exactly_this():
    numpy = {
        f"numpy.{core}.{mod}.{fn}"
        for core in ("core", "_core")
        for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                        ("numeric", "_frombuffer"))  # fmt: skip
    }
    storages = {
        f"torch.{t}Storage"
        for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
                  "Bool", "ComplexFloat", "ComplexDouble")  # fmt: skip
    }
    assert ALLOWED_GLOBALS == frozenset(
        numpy
        | storages
        | {
            "numpy.ndarray",
            "numpy.dtype",
            "collections.OrderedDict",
            "builtins.set",
            "builtins.frozenset",
            "__builtin__.set",
            "__builtin__.frozenset",
            "_codecs.encode",
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_parameter",
        }
    )


def _genuine(tmp_path):
    """Small genuine checkpoints: torch zip and legacy (protocols 2 and 4) and a .pkl."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = {"model": model.state_dict(), "iteration": 7, "np": np.random.get_state(),
             "py": random.getstate(), "half": torch.ones(3, dtype=torch.float16)}  # fmt: skip
    files = []
    for protocol in (2, 4):
        for legacy in (False, True):
            path = str(tmp_path / f"g{protocol}{'L' if legacy else ''}.pth")
            torch.save(
                state, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy
            )
            files.append(path)
    pkl = str(tmp_path / "g.pkl")
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"w": np.ones((4, 3), np.float32)}, "__author__": "x"}, f, 2)
    return files + [pkl], state


def test_genuine_files_of_every_protocol_load_exactly(tmp_path):
    files, state = _genuine(tmp_path)
    for path in files[:-1]:
        data = load_checkpoint_file(path)
        for k, v in state["model"].items():
            assert torch.equal(data["model"][k], v), (path, k)
        assert data["model"]._metadata == state["model"]._metadata
        assert data["iteration"] == 7 and data["py"] == state["py"]
        assert np.array_equal(data["np"][1], state["np"][1])
        assert data["half"].dtype == torch.float16
    assert load_checkpoint_file(files[-1])["model"]["w"].shape == (4, 3)


def test_numpy_in_a_torch_file_is_read_but_a_command_beside_it_is_refused(tmp_path):
    # the numpy fallback (files of earlier versions) must not open the door to anything else
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "mixed.pth")
    torch.save({"model": {}, "np": np.random.get_state(), "x": RunsCommand(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_checkpoint_file(path)
    assert not os.path.exists(marker)


def test_genuine_files_of_each_kind_load(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    # detectron2 model zoo .pkl (protocol 2, as detectron2's converters write it)
    d2 = str(tmp_path / "d2.pkl")
    with open(d2, "wb") as f:
        pickle.dump({"model": {"a.weight": w}, "__author__": "torchvision"}, f, protocol=2)
    assert np.array_equal(load_checkpoint_file(d2)["model"]["a.weight"], w)
    # Caffe2 / MSRA ImageNet weights: {"blobs": {name: ndarray}} with numpy scalars
    c2 = str(tmp_path / "R-50.pkl")
    with open(c2, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": w, "lr": np.float32(0.1)}}, f, protocol=2)
    blobs = load_checkpoint_file(c2)["blobs"]
    assert np.array_equal(blobs["conv1_w"], w) and blobs["lr"] == np.float32(0.1)
    # numpy arrays as protocol 5 pickles them (numpy.core.numeric._frombuffer)
    p5 = str(tmp_path / "p5.pkl")
    with open(p5, "wb") as f:
        pickle.dump({"model": {"a.weight": w}, "__author__": "x"}, f, protocol=5)
    assert np.array_equal(load_checkpoint_file(p5)["model"]["a.weight"], w)
    # a torchvision-style state dict and a detectron2 checkpoint (.pth)
    tv = str(tmp_path / "tv.pth")
    torch.save(collections.OrderedDict(weight=torch.ones(2, 2)), tv)
    assert torch.equal(load_checkpoint_file(tv)["weight"], torch.ones(2, 2))
    # a checkpoint holding NumPy's generator state (a NumPy array) is readable
    old = str(tmp_path / "model_0000009.pth")
    state = np.random.get_state()
    torch.save(
        {"model": {"w": torch.ones(1)}, "iteration": 9, "np": state, "py": random.getstate()}, old
    )
    data = load_checkpoint_file(old)
    assert data["iteration"] == 9 and np.array_equal(data["np"][1], state[1])


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x80\x02not a checkpoint" * 8)
    with pytest.raises(DamagedCheckpointError) as e:
        load_checkpoint_file(str(path))
    assert e.value.path == str(path) and str(path) in str(e.value)


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif kind == 2:  # insert bytes
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # flip bytes inside the pickle (zip: data.pkl comes first)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 600))] = rng.randrange(256)
    return bytes(b)


def test_randomly_corrupted_genuine_files_fail_only_with_the_named_errors(tmp_path):
    files, _ = _genuine(tmp_path)
    rng = random.Random(0)
    outcomes = collections.Counter()
    for i in range(400):
        src = files[i % len(files)]
        path = str(tmp_path / f"c{i}{os.path.splitext(src)[1]}")
        with open(src, "rb") as f, open(path, "wb") as g:
            g.write(_corrupt(f.read(), rng))
        try:
            load_checkpoint_file(path)
            outcomes["loaded"] += 1
        except (UnsafeCheckpointError, DamagedCheckpointError) as e:
            assert e.path == path and path in str(e)
            outcomes[type(e).__name__] += 1
    assert outcomes["DamagedCheckpointError"] > 100, outcomes  # the fuzzing hits the parser


@pytest.mark.parametrize("what", ["fifo", "device", "folder", "missing"])
def test_what_is_not_a_regular_file_is_named_and_not_read(tmp_path, what):
    path = {"fifo": str(tmp_path / "f.pth"), "device": "/dev/zero", "folder": str(tmp_path),
            "missing": str(tmp_path / "none.pth")}[what]  # fmt: skip
    if what == "fifo":
        os.mkfifo(path)  # opening it for reading would block until a writer comes
    with pytest.raises(DamagedCheckpointError) as e:
        load_checkpoint_file(path)
    assert e.value.path == path


_READERS = re.compile(
    r"(?<![`\w.])(torch\.load|torch\.jit\.load|pickle\.loads?|pickle\.Unpickler|yaml\.unsafe_load|"
    r"yaml\.load|np\.load|numpy\.load)\(|merge_from_file\((?![^)]*allow_unsafe=False)"
)


def test_no_module_reads_a_file_but_through_the_guards():
    """Every checkpoint read goes through eapm.safe_load and every yaml through
    eapm.config. The plain reads: convert_checkpoint.py's explicit --trust-source,
    eapm.export.load_exported, which runs a TorchScript program the user exported, and the
    benchmark's reference reading of a file it wrote itself."""
    found = []
    roots = [os.path.join(REPO, d) for d in ("projects", "tools", "demo")]
    files = [os.path.join(REPO, "train_net.py")]
    for root in roots:
        for folder, _, names in os.walk(root):
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                code = re.sub(r"``[^`]*``", "", line.split("#")[0])  # not docstring literals
                if _READERS.search(code):
                    found.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    trusted = [re.sub(r":\d+:", ":", f) for f in found if "convert_checkpoint" in f]
    assert trusted == [  # the explicit --trust-source conversion, in _trusted_load
        'tools/convert_checkpoint.py: return pickle.load(f, encoding="latin1")',
        'tools/convert_checkpoint.py: return torch.load(path, map_location="cpu", '
        "weights_only=False)",
    ]
    others = [re.sub(r":\d+:", ":", f) for f in found if "convert_checkpoint" not in f]
    assert others == [
        'projects/eapm/export.py: ts = torch.jit.load(path, map_location="cpu")',
        # the guard's cost is measured against torch.load of a file the benchmark just wrote
        'tools/benchmarks/guards.py: "torch.load": lambda: torch.load(path, map_location="cpu"),',
    ]
