"""The one interface every federated strategy implements, and the shared result types.

A strategy decides which clients train in a round (:meth:`Strategy.configure_fit`),
turns their results into the next global model (:meth:`Strategy.aggregate_fit`),
does the same for evaluation, and may change local training through two
client-side hooks (an extra loss term, a transform of the final update). It
never touches a network or a model object: servers, clients and the
simulation call it with plain :data:`Parameters`, so the same object serves a
gRPC deployment and a single-process simulation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from distml.errors import ConfigError
from distml.federated.parameters import Parameters, add_update, clone_parameters, subtract

ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class FitResult:
    """What one client returns after local training.

    ``parameters`` holds the client's new weights, or, when ``is_update`` is
    true, the update ``w_local - w_global`` (what secure aggregation and local
    differential privacy produce).
    """

    client_id: int
    parameters: Parameters
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    is_update: bool = False

    def update(self, current: Sequence[torch.Tensor]) -> Parameters:
        """The update ``w_local - current`` in floating point."""
        if self.is_update:
            return list(self.parameters)
        return subtract(self.parameters, current)


@dataclass(frozen=True)
class EvaluateResult:
    """What one client returns after evaluating the global model on its data."""

    client_id: int
    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def sample_clients(
    available_client_ids: Sequence[int], num_clients: int, rng: np.random.Generator
) -> list[int]:
    """``num_clients`` distinct ids drawn uniformly without replacement, sorted."""
    ids = np.asarray(sorted(available_client_ids), dtype=np.int64)
    if num_clients > len(ids):
        raise ValueError(f"cannot sample {num_clients} clients from {len(ids)} available")
    chosen = rng.choice(ids, size=num_clients, replace=False)
    return sorted(int(c) for c in chosen)


def weighted_mean(
    tensor_lists: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> Parameters:
    """Tensor-wise ``sum_k w_k x_k / sum_k w_k``."""
    if not tensor_lists:
        raise ValueError("weighted_mean of no tensors")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    out: Parameters = []
    for i in range(len(tensor_lists[0])):
        stacked = torch.stack([lst[i] for lst in tensor_lists])
        coeff = torch.tensor([w / total for w in weights], dtype=stacked.dtype)
        # tensordot contracts the client dimension in one kernel.
        out.append(torch.tensordot(coeff, stacked, dims=1))
    return out


def weighted_metrics(
    values: Sequence[Mapping[str, float]], num_examples: Sequence[int]
) -> dict[str, float]:
    """Example-weighted mean of every metric key that all entries report."""
    if not values:
        return {}
    total = float(sum(num_examples))
    if total <= 0:
        return {}
    common = set(values[0]).intersection(*values[1:])
    return {
        key: sum(float(v[key]) * n for v, n in zip(values, num_examples, strict=True)) / total
        for key in sorted(common)
    }


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


class Strategy(ABC):
    """Base class: client sampling, evaluation aggregation and no-op client hooks.

    Subclasses implement :meth:`aggregate_fit` and, when they change local
    training, :meth:`client_loss_term` or :meth:`client_update`. Every option
    is a keyword-only constructor argument so that :func:`build_strategy` can
    validate configs against the signature.
    """

    name: ClassVar[str] = ""
    #: True when aggregate_fit depends on the results only through their
    #: example-weighted mean update, so a secure sum of the updates suffices.
    linear_aggregation: ClassVar[bool] = False

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        fraction_evaluate: float = 1.0,
        min_evaluate_clients: int = 1,
        min_available_clients: int = 1,
    ) -> None:
        for key, frac in (("fraction_fit", fraction_fit), ("fraction_evaluate", fraction_evaluate)):
            require(0.0 < frac <= 1.0, f"{self.name} option {key} must be in (0, 1], got {frac}")
        for key, count in (
            ("min_fit_clients", min_fit_clients),
            ("min_evaluate_clients", min_evaluate_clients),
            ("min_available_clients", min_available_clients),
        ):
            require(count >= 1, f"{self.name} option {key} must be >= 1, got {count}")
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def options(self) -> dict[str, Any]:
        """The constructor options of this instance (what a config would hold)."""
        from distml.federated.strategies.registry import strategy_options

        return {k: getattr(self, k) for k in strategy_options(type(self)) if hasattr(self, k)}

    # -- server side -------------------------------------------------------

    def num_fit_clients(self, num_available: int) -> int:
        return max(math.floor(self.fraction_fit * num_available), self.min_fit_clients)

    def num_evaluate_clients(self, num_available: int) -> int:
        return max(math.floor(self.fraction_evaluate * num_available), self.min_evaluate_clients)

    def configure_fit(
        self, server_round: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        """Clients to train this round; empty when too few are available (the server waits)."""
        return self._sample(
            self.num_fit_clients(len(available_client_ids)), available_client_ids, rng
        )

    def configure_evaluate(
        self, server_round: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        """Clients to evaluate this round; empty when too few are available."""
        count = self.num_evaluate_clients(len(available_client_ids))
        return self._sample(count, available_client_ids, rng)

    def _sample(
        self, count: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        available = len(available_client_ids)
        if available < max(count, self.min_available_clients):
            return []
        return sample_clients(available_client_ids, count, rng)

    def record_sampling(self, num_sampled: int, num_available: int) -> None:
        """Told by callers that sample clients themselves (DP accounting needs the rate)."""
        return None

    def fit_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Settings sent to each sampled client with the global model (e.g. ``proximal_mu``)."""
        return {}

    @abstractmethod
    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        """The next global model from this round's client results."""

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[EvaluateResult]
    ) -> dict[str, float]:
        """Example-weighted mean loss (``"loss"``) and of every metric all clients report."""
        if not results:
            return {}
        counts = [r.num_examples for r in results]
        merged = [{**r.metrics, "loss": r.loss} for r in results]
        return weighted_metrics(merged, counts)

    def round_metrics(self) -> dict[str, float]:
        """Numbers the strategy tracks across rounds (e.g. privacy spent), for the round log."""
        return {}

    def mean_update(self, results: Sequence[FitResult], current: Parameters) -> Parameters:
        """Example-weighted mean of the client updates (the FedAvg pseudo-gradient, negated)."""
        updates = [r.update(current) for r in results]
        return weighted_mean(updates, [r.num_examples for r in results])

    # -- client side -------------------------------------------------------

    def client_loss_term(
        self, params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        """Extra term the local trainer adds to each mini-batch loss; None for none.

        ``params`` and ``global_params`` are the trainable tensors only, in
        ``named_parameters`` order. It must be built from plain tensor ops so
        that it works under ``torch.vmap``.
        """
        return None

    def client_update(self, update: Parameters, generator: torch.Generator) -> Parameters:
        """Transform a client's final update before it is sent (local DP clips and noises)."""
        return update

    def client_correction(self, client_id: int, current: Parameters) -> Parameters | None:
        """A constant client ``client_id`` adds to every gradient (SCAFFOLD's ``c - c_i``).

        In ``current``'s layout (all state entries); None for none. Trainers add it
        as the linear loss term ``<params, correction>`` over trainable tensors.
        """
        return None


def unchanged(current: Parameters) -> Parameters:
    """The model a round with no results yields: the current one, copied."""
    return clone_parameters(current)


def apply_update(current: Parameters, update: Parameters) -> Parameters:
    return add_update(current, update)
