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


@pytest.fixture(autouse=True, scope="session")
def _dataset_check_cache(tmp_path_factory):
    """The dataset checks' cache (``eapm.data``) in a temporary folder, not the user's
    ``~/.cache/eapm``; subprocesses inherit it through the environment."""
    import os

    old = os.environ.get("EAPM_CACHE")
    os.environ["EAPM_CACHE"] = str(tmp_path_factory.mktemp("eapm_cache"))
    yield
    if old is None:
        os.environ.pop("EAPM_CACHE", None)
    else:
        os.environ["EAPM_CACHE"] = old
