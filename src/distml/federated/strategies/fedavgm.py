"""FedAvgM (Hsu et al. 2019): FedAvg with server-side momentum on the averaged update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distml.federated.parameters import Parameters
from distml.federated.strategies.base import (
    FitResult,
    Strategy,
    apply_update,
    require,
    unchanged,
)


class FedAvgM(Strategy):
    """``v <- beta v + mean_update``; ``w <- w + server_learning_rate * v``."""

    name = "fedavgm"
    linear_aggregation = True

    def __init__(
        self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **base: Any
    ) -> None:
        super().__init__(**base)
        require(
            server_learning_rate > 0,
            f"fedavgm option server_learning_rate must be > 0, got {server_learning_rate}",
        )
        require(
            0 <= server_momentum < 1,
            f"fedavgm option server_momentum must be in [0, 1), got {server_momentum}",
        )
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.velocity: Parameters | None = None

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        delta = self.mean_update(results, current)
        if self.velocity is None:
            self.velocity = delta
        else:
            self.velocity = [
                self.server_momentum * v + d for v, d in zip(self.velocity, delta, strict=True)
            ]
        step = [self.server_learning_rate * v for v in self.velocity]
        return apply_update(current, step)
