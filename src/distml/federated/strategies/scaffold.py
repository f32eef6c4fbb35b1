"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift, option II.

The server keeps a control variate ``c`` and one ``c_i`` per client (zero
until the client first trains). Client ``i`` runs ``K`` local SGD steps
``y <- y - lr (g_i(y) - c_i + c)``; the trainer gets the correction ``c - c_i``
from :meth:`Scaffold.client_correction` (the gradient of the linear loss
term ``<y, c - c_i>``). Afterwards option II sets
``c_i+ = c_i - c + (x - y) / (K lr)``, and the server applies
``x <- x + server_lr * mean(y - x)`` and ``c <- c + |S|/N * mean(c_i+ - c_i)``
over the ``|S|`` sampled of ``N`` available clients, with uniform means as
in the paper. Client controls live on the server here because simulated
clients are stateless; deployment (where each client would keep its own
``c_i`` and exchange ``c`` with the model) is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distml.federated.parameters import Parameters
from distml.federated.strategies.base import FitResult, Strategy, require, unchanged


class Scaffold(Strategy):
    """Stochastic controlled averaging; results must carry ``local_steps`` and ``lr`` metrics."""

    name = "scaffold"

    def __init__(self, *, server_lr: float = 1.0, **base: Any) -> None:
        super().__init__(**base)
        require(server_lr > 0, f"scaffold option server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.control: Parameters = []
        self.client_controls: dict[int, Parameters] = {}
        self._num_available = 0

    def record_sampling(self, num_sampled: int, num_available: int) -> None:
        self._num_available = num_available

    def configure_fit(
        self, server_round: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        chosen = super().configure_fit(server_round, available_client_ids, rng)
        self._num_available = len(available_client_ids)
        return chosen

    def client_correction(self, client_id: int, current: Parameters) -> Parameters | None:
        """``c - c_i`` in the layout of ``current`` (zeros before any round)."""
        c = self.control or _zeros(current)
        c_i = self.client_controls.get(client_id) or _zeros(current)
        return [a - b for a, b in zip(c, c_i, strict=True)]

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        c = self.control or _zeros(current)
        deltas_y, deltas_c = [], []
        for r in results:
            steps, lr = r.metrics.get("local_steps", 0.0), r.metrics.get("lr", 0.0)
            require(
                steps > 0 and lr > 0,
                "scaffold needs each client result's local_steps and lr metrics; run it in "
                "simulation without DP or secure aggregation",
            )
            dy = [u.to(torch.float32) for u in r.update(current)]
            c_i = self.client_controls.get(r.client_id) or _zeros(current)
            # Option II: c_i+ = c_i - c + (x - y) / (K lr), with y - x = dy.
            new_c_i = [ci - cc - d / (steps * lr) for ci, cc, d in zip(c_i, c, dy, strict=True)]
            deltas_c.append([n - o for n, o in zip(new_c_i, c_i, strict=True)])
            self.client_controls[r.client_id] = new_c_i
            deltas_y.append(dy)
        m = len(results)
        mean_dy = [torch.stack(ts).sum(0) / m for ts in zip(*deltas_y, strict=True)]
        mean_dc = [torch.stack(ts).sum(0) / m for ts in zip(*deltas_c, strict=True)]
        share = m / max(self._num_available, m)
        self.control = [a + share * d for a, d in zip(c, mean_dc, strict=True)]
        out: Parameters = []
        for x, d in zip(current, mean_dy, strict=True):
            new = x.to(d.dtype) + self.server_lr * d
            out.append(new if x.is_floating_point() else torch.round(new).to(x.dtype))
        return out


def _zeros(like: Parameters) -> Parameters:
    return [torch.zeros(t.shape, dtype=torch.float32) for t in like]
