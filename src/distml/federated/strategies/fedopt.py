"""Adaptive server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization".

Algorithm 2 of the paper: with the round's mean client update ``delta``,
``m <- beta_1 m + (1 - beta_1) delta``, a second moment ``v`` updated by the
subclass (Adagrad, Adam or Yogi rule), and ``x <- x + eta m / (sqrt(v) + tau)``.
``m`` starts at 0 and ``v`` at ``tau^2`` (the paper asks for ``v_{-1} >= tau^2``);
no bias correction, as in the paper. ``delta`` is example-weighted, like FedAvg.
``eta_l`` is the client learning rate, sent to clients as ``fit_config()["lr"]``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from distml.federated.parameters import Parameters
from distml.federated.strategies.base import (
    ConfigValue,
    FitResult,
    Strategy,
    apply_update,
    require,
    unchanged,
)


class FedOpt(Strategy):
    """Shared state and step of FedAdagrad, FedAdam and FedYogi."""

    linear_aggregation = True

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        require(eta > 0, f"{self.name} option eta must be > 0, got {eta}")
        require(eta_l > 0, f"{self.name} option eta_l must be > 0, got {eta_l}")
        require(0 <= beta_1 < 1, f"{self.name} option beta_1 must be in [0, 1), got {beta_1}")
        require(0 <= beta_2 < 1, f"{self.name} option beta_2 must be in [0, 1), got {beta_2}")
        require(tau > 0, f"{self.name} option tau must be > 0, got {tau}")
        self.eta = eta
        self.eta_l = eta_l
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.m: Parameters | None = None
        self.v: Parameters | None = None

    def fit_config(self, server_round: int) -> dict[str, ConfigValue]:
        return {"lr": self.eta_l}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and the squared mean update."""

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        delta = self.mean_update(results, current)
        if self.m is None or self.v is None:
            self.m = [torch.zeros_like(d) for d in delta]
            self.v = [torch.full_like(d, self.tau**2) for d in delta]
        self.m = [
            self.beta_1 * m + (1 - self.beta_1) * d for m, d in zip(self.m, delta, strict=True)
        ]
        self.v = [self.second_moment(v, d * d) for v, d in zip(self.v, delta, strict=True)]
        step = [
            self.eta * m / (torch.sqrt(v) + self.tau) for m, v in zip(self.m, self.v, strict=True)
        ]
        return apply_update(current, step)
