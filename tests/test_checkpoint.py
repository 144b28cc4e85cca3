"""eapm/checkpoint.py, EAPMCheckpointer: a save that fails leaves the previous checkpoint and
its tag; damaged checkpoints are skipped for the last readable one, then fail naming every file;
a refused file (MODEL.WEIGHTS, --eval-only, init_checkpoint, --resume) is refused, never
fallen back from."""

from __future__ import annotations

import os

import pytest
import torch

from eapm.checkpoint import EAPMCheckpointer
from eapm.safe_load import UnsafeCheckpointError
from tests.helpers import evil_files, last_checkpoint


def _checkpointer(tmp_path):
    from eapm.checkpoint import EAPMCheckpointer

    model = torch.nn.Linear(3, 2)
    return model, EAPMCheckpointer(model, str(tmp_path))


def test_a_failed_save_leaves_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000004")
    good = (tmp_path / "model_0000004.pth").read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000009")
    assert not (tmp_path / "model_0000009.pth").exists()
    assert not list(tmp_path.glob("*.tmp.*"))  # the temporary file was removed
    assert (tmp_path / "model_0000004.pth").read_bytes() == good
    assert last_checkpoint(tmp_path) == "model_0000004.pth"


def test_damaged_checkpoints_fall_back_then_fail_naming_every_file(tmp_path, caplog):
    from eapm.checkpoint import DamagedCheckpointError

    model, ckpt = _checkpointer(tmp_path)
    for it in (4, 9, 14):
        with torch.no_grad():
            model.weight.fill_(it)
        ckpt.save(f"model_{it:07d}")
    (tmp_path / "model_0000014.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "model_0000009.pth").unlink()  # listed nowhere any more: skipped silently
    with torch.no_grad():
        model.weight.zero_()
    ckpt.resume_or_load("", resume=True)
    assert float(model.weight[0, 0]) == 4.0
    assert "model_0000014.pth cannot be read" in caplog.text
    (tmp_path / "model_0000004.pth").write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match="no readable checkpoint") as e:
        ckpt.resume_or_load("", resume=True)
    assert "model_0000014.pth" in str(e.value) and "model_0000004.pth" in str(e.value)


@pytest.mark.parametrize("kind", ["torchscript", "protocol 4"])
def test_weights_and_resume_refuse_and_do_not_fall_back(tmp_path, kind):
    marker = str(tmp_path / "marker")
    evil = evil_files(tmp_path, marker)[kind]
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafeCheckpointError):  # MODEL.WEIGHTS, --eval-only, init_checkpoint
        EAPMCheckpointer(model).load(evil)
    out = tmp_path / "out"
    out.mkdir()
    saver = EAPMCheckpointer(model, str(out))
    saver.save("model_0000004")  # a genuine older checkpoint the resume must not fall back to
    planted = str(out / "model_0000009.pth")
    with open(evil, "rb") as f, open(planted, "wb") as g:
        g.write(f.read())
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeCheckpointError) as e:  # --resume
        EAPMCheckpointer(model, str(out)).resume_or_load("", resume=True)
    assert e.value.path == planted
    assert not os.path.exists(marker)
