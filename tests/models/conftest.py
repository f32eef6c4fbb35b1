"""Shared fixtures for the model-zoo tests: one intra-op thread, fixed seed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_seeded() -> Iterator[None]:
    # The CI box is shared: one thread keeps timings stable and results reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
