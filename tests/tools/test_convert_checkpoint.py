"""tools/convert_checkpoint.py: the check names refused, damaged and special files and runs
nothing; a trusted file (--trust-source) is converted to one plain torch reads as data."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from tests.helpers import REPO, evil_files, write_malicious


def test_the_check_tool_names_refused_damaged_and_special_files(tmp_path):
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    marker = str(tmp_path / "marker")
    ts = evil_files(tmp_path, marker)["torchscript"]
    fifo = str(tmp_path / "fifo.pth")
    os.mkfifo(fifo)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    for path, verdict in [(ts, "REFUSED"), (fifo, "DAMAGED"), (str(damaged), "DAMAGED")]:
        proc = subprocess.run(
            [sys.executable, tool, path], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 1, (path, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(f"{verdict}: checkpoint {path}"), proc.stderr
    assert not os.path.exists(marker)


def test_convert_checkpoint_checks_and_converts_a_trusted_file(tmp_path):
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    marker = str(tmp_path / "marker")
    evil = write_malicious(str(tmp_path / "evil.pth"), marker)
    check = subprocess.run([sys.executable, tool, evil], capture_output=True, text=True)
    assert check.returncode == 1 and "REFUSED" in check.stderr and evil in check.stderr
    assert not os.path.exists(marker)
    old = str(tmp_path / "old.pth")
    torch.save({"model": {"w": torch.ones(2)}, "np": np.random.get_state()}, old)
    out = str(tmp_path / "new.pth")
    conv = subprocess.run(
        [sys.executable, tool, "--trust-source", old, out], capture_output=True, text=True
    )
    assert conv.returncode == 0, conv.stderr
    data = torch.load(out, weights_only=True)  # plain torch can read it as data now
    assert torch.equal(data["model"]["w"], torch.ones(2)) and data["np"][0] == "MT19937"
