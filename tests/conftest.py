"""pytest configuration: two threads per test process, and the ``storage`` fixture
(detectron2's event storage, which the models' diagnostics write to). The helpers the
tests share live in ``tests/helpers.py`` (those the tools use too, in ``eapm.utils.testing``)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as s:
        yield s
