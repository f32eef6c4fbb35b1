"""Krum and Multi-Krum (Blanchard et al. 2017), robust to ``f`` Byzantine clients.

Each client's score is the sum of squared L2 distances from its update to its
``n - f - 2`` nearest other updates; the ``m`` lowest-scoring clients are kept
and their updates averaged by example count (Krum keeps ``m = 1``). The rule
needs ``n >= 2f + 3`` clients in the round. Both live in one file because Krum
is Multi-Krum with ``m = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distml.errors import ConfigError
from distml.federated.parameters import Parameters, flatten
from distml.federated.strategies.base import (
    FitResult,
    Strategy,
    apply_update,
    require,
    unchanged,
    weighted_mean,
)


def krum_scores(vectors: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum score of each row of ``vectors`` (n, d); lower is more central."""
    n = vectors.shape[0]
    neighbours = n - num_byzantine - 2
    if n < 2 * num_byzantine + 3:
        raise ConfigError(
            f"krum with num_byzantine={num_byzantine} needs at least "
            f"{2 * num_byzantine + 3} clients per round, got {n}; sample more clients"
        )
    v = vectors.to(torch.float64)
    dist = torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    dist.fill_diagonal_(float("inf"))
    return torch.sort(dist, dim=1).values[:, :neighbours].sum(dim=1)


def krum_aggregate(
    results: Sequence[FitResult], current: Parameters, num_byzantine: int, keep: int
) -> tuple[Parameters, list[int]]:
    """The next model from the ``keep`` best-scored updates, and their client ids."""
    updates = [r.update(current) for r in results]
    scores = krum_scores(torch.stack([flatten(u) for u in updates]), num_byzantine)
    order = torch.argsort(scores, stable=True)[: min(keep, len(results))].tolist()
    mean = weighted_mean([updates[i] for i in order], [results[i].num_examples for i in order])
    return apply_update(current, mean), [results[i].client_id for i in order]


class Krum(Strategy):
    """Keep the single best-scored update."""

    name = "krum"

    def __init__(self, *, num_byzantine: int = 1, **base: Any) -> None:
        super().__init__(**base)
        require(num_byzantine >= 0, f"krum option num_byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine
        self.last_selected: list[int] = []

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        new, self.last_selected = krum_aggregate(results, current, self.num_byzantine, 1)
        return new


class MultiKrum(Strategy):
    """Average of the ``num_selected`` best-scored updates (``None``: ``n - f``)."""

    name = "multikrum"

    def __init__(
        self, *, num_byzantine: int = 1, num_selected: int | None = None, **base: Any
    ) -> None:
        super().__init__(**base)
        require(
            num_byzantine >= 0, f"multikrum option num_byzantine must be >= 0, got {num_byzantine}"
        )
        require(
            num_selected is None or num_selected >= 1,
            f"multikrum option num_selected must be >= 1, got {num_selected}",
        )
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        self.last_selected: list[int] = []

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        keep = self.num_selected or len(results) - self.num_byzantine
        new, self.last_selected = krum_aggregate(results, current, self.num_byzantine, keep)
        return new
