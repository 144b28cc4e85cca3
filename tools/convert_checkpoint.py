#!/usr/bin/env python
"""Check a checkpoint, or convert one you trust into a file that loads as data.

    python tools/convert_checkpoint.py IN                      # check: loads as data, or why not
    python tools/convert_checkpoint.py --trust-source IN OUT   # convert a trusted file

The check reads IN exactly as training does (``eapm.safe_load``) and prints ``OK: ...``
(exit 0), ``REFUSED: ...`` (it refers to code: exit 1) or ``DAMAGED: ...`` (it cannot be
read: truncated, corrupted, not a checkpoint, not a regular file: exit 1).

Every load of this project refuses a checkpoint that refers to anything but tensors,
arrays, numbers, strings and containers (``eapm.safe_load``). ``--trust-source`` is the one
way past that check, and it is explicit and one-off: IN is read with plain ``pickle`` /
``torch.load`` (which RUNS whatever the file asks: only for files from a source you trust),
the tensors, arrays and plain values in it are kept, anything else is dropped with its key
printed, and OUT (``.pth``) is written so that it loads with ``torch.load(weights_only=True)``
(numpy arrays become tensors). OUT is then checked by loading it as data.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import sys
from typing import Any, List

import numpy as np
import torch

from eapm.safe_load import DamagedCheckpointError, UnsafeCheckpointError, load_checkpoint_file

_PLAIN = (str, bytes, int, float, bool, type(None))
_DROP = object()  # what to_data returns for a value it drops


def to_data(obj: Any, key: str, dropped: List[str]) -> Any:
    """``obj`` with numpy arrays / scalars as tensors / Python numbers and every value that
    is not a tensor, number, string or container dropped (its key appended to ``dropped``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype in (np.uint16, np.uint32, np.uint64):  # no torch.save storage for these
            return obj.tolist()
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            if not isinstance(k, _PLAIN):
                dropped.append(f"{key}[{k!r}] (key of type {type(k).__name__})")
                continue
            sub = f"{key}[{k!r}]"
            value = to_data(v, sub, dropped)
            if value is not _DROP:
                out[k] = value
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_data(v, f"{key}[{i}]", dropped) for i, v in enumerate(obj)]
        items = [v for v in items if v is not _DROP]
        return items if isinstance(obj, list) else tuple(items)
    dropped.append(f"{key} ({type(obj).__module__}.{type(obj).__qualname__})")
    return _DROP


def _trusted_load(path: str) -> Any:
    if os.path.splitext(path)[1] == ".pkl":
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint file (.pth, .pkl, ...)")
    parser.add_argument("output", nargs="?", help="converted file (.pth), with --trust-source")
    parser.add_argument(
        "--trust-source",
        action="store_true",
        help="read INPUT with plain pickle (runs what it asks: only for trusted files) and "
        "write its tensors, arrays and plain values to OUTPUT",
    )
    args = parser.parse_args(argv)
    if not args.trust_source:
        if args.output:
            parser.error("OUTPUT is written only with --trust-source")
        try:
            load_checkpoint_file(args.input)
        except UnsafeCheckpointError as e:
            print(f"REFUSED: {e}", file=sys.stderr)
            return 1
        except DamagedCheckpointError as e:
            print(f"DAMAGED: {e}", file=sys.stderr)
            return 1
        print(f"OK: {args.input} loads as data")
        return 0
    if not args.output:
        parser.error("--trust-source needs OUTPUT")
    print(
        f"WARNING: --trust-source reads {args.input} with plain pickle / torch.load, which RUNS "
        "any code the file holds: use it only for a file from a source you trust",
        file=sys.stderr,
    )
    dropped: List[str] = []
    data = to_data(_trusted_load(args.input), "checkpoint", dropped)
    if data is _DROP or not isinstance(data, dict):
        print(f"error: {args.input} holds no dict of tensors", file=sys.stderr)
        return 1
    tmp = f"{args.output}.tmp.{os.getpid()}"
    torch.save(data, tmp)
    os.replace(tmp, args.output)
    load_checkpoint_file(args.output)  # what it wrote loads as data
    for what in dropped:
        print(f"dropped {what}")
    print(f"wrote {args.output} ({len(dropped)} value(s) dropped); it loads as data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
