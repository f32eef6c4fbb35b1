"""Shared fixtures for the memory tests: one thread, fixed seed, sklearn digits, a trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

Digits = tuple[Tensor, Tensor, Tensor, Tensor]


@pytest.fixture(autouse=True)
def _single_thread_seeded() -> Iterator[None]:
    # The box is shared by several agents: one thread keeps timings stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> Digits:
    """Digits scaled to [0, 1], seeded stratified 80/20 split: (x_tr, y_tr, x_te, y_te)."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=0, stratify=y
    )
    return (
        torch.tensor(x_tr, dtype=torch.float32),
        torch.tensor(y_tr),
        torch.tensor(x_te, dtype=torch.float32),
        torch.tensor(y_te),
    )


def _make_mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Digits,
    epochs: int = 30,
    batch: int = 64,
) -> nn.Module:
    x, y, _, _ = data
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, data: Digits) -> float:
    _, _, x, y = data
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="session")
def trained_mlp(digits: Digits) -> nn.Module:
    """A 64-128-10 MLP trained with torch AdamW (reused, so tests deep-copy it)."""
    # Session fixtures run before the per-test single-thread fixture.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _make_mlp()
    _train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), digits)
    torch.set_num_threads(threads)
    return model.eval()


# Helpers as fixtures: test modules must not import conftest (several folders have one).
@pytest.fixture(scope="session")
def make_mlp() -> Callable[..., nn.Module]:
    return _make_mlp


@pytest.fixture(scope="session")
def train_digits() -> Callable[..., nn.Module]:
    return _train


@pytest.fixture(scope="session")
def digits_accuracy() -> Callable[[nn.Module, Digits], float]:
    return _accuracy
