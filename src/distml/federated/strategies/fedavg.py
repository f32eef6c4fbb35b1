"""FedAvg (McMahan et al. 2017): the new model is the example-weighted mean of client models."""

from __future__ import annotations

from collections.abc import Sequence

from distml.federated.parameters import Parameters
from distml.federated.strategies.base import FitResult, Strategy, apply_update, unchanged


class FedAvg(Strategy):
    """``w <- sum_k n_k w_k / sum_k n_k`` over the round's clients."""

    name = "fedavg"
    linear_aggregation = True

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        # Averaging updates instead of weights lets results mix both forms.
        return apply_update(current, self.mean_update(results, current))
