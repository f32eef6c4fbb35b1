"""FedAdagrad (Reddi et al. 2021): second moment ``v <- v + delta^2``."""

from __future__ import annotations

import torch

from distml.federated.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
