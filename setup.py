"""Packaging: everything is declared in setup.cfg; this file only adds the repository's
configs/ to the built package as ``eapm/configs/`` (read by ``eapm.model_zoo``), so that
configs/ stays the single source (nothing is copied in the repository; an editable install
reads configs/ in place)."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # eapm.model_zoo finds configs/ beside projects/ in a checkout
        src = os.path.join(HERE, "configs")
        dst = os.path.join(self.build_lib, "eapm", "configs")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
