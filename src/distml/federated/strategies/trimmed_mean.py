"""Coordinate-wise trimmed mean (Yin et al. 2018).

For each coordinate, drop the ``floor(beta * n)`` largest and as many smallest
client values, then average the rest (unweighted, like FedMedian).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distml.errors import ConfigError
from distml.federated.parameters import Parameters
from distml.federated.strategies.base import (
    FitResult,
    Strategy,
    apply_update,
    require,
    unchanged,
)


class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, **base: Any) -> None:
        super().__init__(**base)
        require(0 <= beta < 0.5, f"trimmed_mean option beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        n = len(results)
        cut = int(self.beta * n)
        if n - 2 * cut < 1:
            raise ConfigError(
                f"trimmed_mean with beta={self.beta} trims all {n} clients; lower beta"
            )
        updates = [r.update(current) for r in results]
        trimmed = []
        for i in range(len(current)):
            ordered = torch.sort(torch.stack([u[i] for u in updates]), dim=0).values
            trimmed.append(ordered[cut : n - cut].mean(dim=0))
        return apply_update(current, trimmed)
