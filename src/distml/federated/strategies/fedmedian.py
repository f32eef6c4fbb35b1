"""FedMedian (Yin et al. 2018): the coordinate-wise median of the client models.

Unweighted on purpose: a robust rule must not let one client buy influence by
claiming many examples. With an even number of clients the two middle values
are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distml.federated.parameters import Parameters
from distml.federated.strategies.base import FitResult, Strategy, apply_update, unchanged


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 0, averaging the two middle values when the count is even."""
    n = stacked.shape[0]
    ordered = torch.sort(stacked, dim=0).values
    if n % 2 == 1:
        return ordered[n // 2]
    return 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class FedMedian(Strategy):
    name = "fedmedian"

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        # median(w_k) - w == median(w_k - w): the update form gives the same model.
        updates = [r.update(current) for r in results]
        median = [
            coordinate_median(torch.stack([u[i] for u in updates])) for i in range(len(current))
        ]
        return apply_update(current, median)
