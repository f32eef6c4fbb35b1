"""FedProx (Li et al. 2020): FedAvg whose clients add ``mu/2 ||w - w_global||^2`` to their loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distml.federated.strategies.base import ConfigValue, require
from distml.federated.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term keeps heterogeneous clients near the global model."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, **base: Any) -> None:
        super().__init__(**base)
        require(mu >= 0, f"fedprox option mu must be >= 0, got {mu}")
        self.mu = mu

    def fit_config(self, server_round: int) -> dict[str, ConfigValue]:
        return {"proximal_mu": self.mu}

    def client_loss_term(
        self, params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        return proximal_term(params, global_params, self.mu)


def proximal_term(
    params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """``mu/2 * sum_i ||params_i - global_i||^2``; global_params carry no gradient."""
    total = sum(((p - g.detach()) ** 2).sum() for p, g in zip(params, global_params, strict=True))
    return 0.5 * mu * torch.as_tensor(total)
