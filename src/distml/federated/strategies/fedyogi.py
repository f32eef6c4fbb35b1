"""FedYogi (Reddi et al. 2021): ``v <- v - (1 - beta_2) delta^2 sign(v - delta^2)``.

Yogi grows ``v`` additively rather than multiplicatively, so the effective
server step shrinks more slowly than with FedAdam when updates are noisy.
"""

from __future__ import annotations

import torch

from distml.federated.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)
