"""Shared test helpers: tiny configs and synthetic batches (CPU, seconds).

The helpers live in the package (``eapm.utils.testing``, also used by the tools); they
are re-exported here because the tests import them as ``from conftest import ...``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from eapm.utils.testing import grad_norms, make_batch, tiny_cfg  # noqa: F401  (re-exported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as s:
        yield s


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
