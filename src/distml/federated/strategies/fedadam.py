"""FedAdam (Reddi et al. 2021): second moment ``v <- beta_2 v + (1 - beta_2) delta^2``."""

from __future__ import annotations

import torch

from distml.federated.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq
