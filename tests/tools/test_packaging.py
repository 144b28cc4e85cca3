"""`pip install .` gives a working package with its configs: a wheel built from a copy of the
repository carries configs/ as eapm/configs/, and, installed into a fresh virtual environment
outside the checkout, loads yacs and LazyConfig configs through eapm.model_zoo."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from tests.helpers import REPO

SOURCES = ["setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_with_configs(tmp_path):
    # build from a copy: the checkout gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for f in SOURCES:
        shutil.copy(os.path.join(REPO, f), src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for d in ("configs", "projects"):
        shutil.copytree(os.path.join(REPO, d), src / d, ignore=ignore)
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=str(tmp_path),
    )
    (wheel,) = glob.glob(str(dist / "eapm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(n for n in names if n.startswith("eapm/configs/"))
    repo_configs = sorted(
        "eapm/configs/" + os.path.relpath(p, os.path.join(REPO, "configs"))
        for p in glob.glob(os.path.join(REPO, "configs", "**", "*.*"), recursive=True)
        if "__pycache__" not in p
    )
    assert configs == repo_configs
    # the Apache-2.0 text setup.cfg's license names travels in the wheel's metadata
    (license_file,) = [n for n in names if n.endswith(".dist-info/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()

    # a fresh venv from the base interpreter; torch & co. visible through a .pth line (which
    # does not run the project venv's own .pth files: its editable eapm stays invisible)
    venv = tmp_path / "venv"
    _run([sys._base_executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(site.stdout.strip(), "project_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "elsewhere"
    out.mkdir()
    check = [py, "-c", "import eapm"]
    assert subprocess.run(check, cwd=str(out), env=env, capture_output=True).returncode != 0
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], env=env)
    script = textwrap.dedent(
        f"""
        import os, eapm
        from eapm import model_zoo
        assert eapm.__file__.startswith({str(venv)!r}), eapm.__file__
        assert model_zoo.CONFIGS_DIR.startswith({str(venv)!r}), model_zoo.CONFIGS_DIR
        path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml")
        cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x_eapm_mu1.5.yaml")
        assert cfg.MODEL.EAPM.CLS.ENABLED and cfg.MODEL.EAPM.CLS.MU == 1.5
        name = "COCO-Detection/libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0.py"
        lazy = model_zoo.get_config(name)
        assert lazy.model.eapm_cls_mu == 1.5 and lazy.model.eapm_reg_theta == 1.0
        print("OK", eapm.__file__, path)
        """
    )
    proc = _run([py, "-c", script], cwd=str(out), env=env)
    assert "OK" in proc.stdout
