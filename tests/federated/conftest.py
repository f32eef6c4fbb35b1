"""Shared data for the federated tests: sklearn's digits (ships with the package, no download)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

Split = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # The machine's cores are shared; one thread keeps timings steady. Restored after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> tuple[Split, Split]:
    """(train, test): 1500 / 297 samples of 64 features scaled to [0, 1], 10 classes."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


@pytest.fixture
def mlp_fn() -> Callable[[], nn.Module]:
    """Builder of the benchmark model, a 64-64-10 MLP."""
    return _mlp
