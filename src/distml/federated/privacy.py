"""Client-level differential privacy for federated averaging, and its RDP accountant.

DP-FedAvg (McMahan et al. 2018): each client update is clipped to L2 norm
``clip_norm`` (C) and Gaussian noise of standard deviation ``noise_multiplier *
C`` (z C) is added to the sum, at the server (``mode="central"``, a trusted
aggregator) or by every client to its own update (``mode="local"``). The
noisy mean is handed to an inner strategy as one update, so server optimizers
such as FedAdam compose with it. The guarantee is user-level (adding or
removing one client's whole data) and is tracked with Renyi DP of the sampled
Gaussian mechanism (Mironov, Talwar and Zhang 2019) over integer orders, with
the sampling rate taken as clients sampled / clients available (Poisson
sampling is assumed; fixed-size sampling is the usual approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distml.errors import ConfigError
from distml.federated.parameters import Parameters
from distml.federated.strategies.base import (
    ConfigValue,
    EvaluateResult,
    FitResult,
    Strategy,
    require,
    unchanged,
)

#: Integer Renyi orders: dense where small budgets are optimal, sparse beyond.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512, 1024)


def _log_a(q: float, sigma: float, alpha: int) -> float:
    """log E[(mu_1/mu_0)^alpha] of the sampled Gaussian for integer alpha (MTZ19, sec. 3.3)."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = (
        math.lgamma(alpha + 1)
        - np.array([math.lgamma(i + 1) for i in k])
        - np.array([math.lgamma(alpha - i + 1) for i in k])
    )
    terms = (
        log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    )
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def compute_rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[int]
) -> np.ndarray:
    """RDP epsilon at each order after ``steps`` compositions of the sampled Gaussian."""
    if not 0 <= sample_rate <= 1:
        raise ConfigError(f"sample rate must be in [0, 1], got {sample_rate}")
    if noise_multiplier < 0:
        raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    out = np.empty(len(orders), dtype=np.float64)
    for i, alpha in enumerate(orders):
        if int(alpha) != alpha or alpha < 2:
            raise ConfigError(f"RDP orders must be integers >= 2, got {alpha}")
        a = int(alpha)
        if sample_rate == 0:
            out[i] = 0.0
        elif noise_multiplier == 0:
            out[i] = math.inf
        elif sample_rate == 1:
            out[i] = a / (2 * noise_multiplier**2)
        else:
            out[i] = _log_a(sample_rate, noise_multiplier, a) / (a - 1)
    return out * steps


def rdp_to_epsilon(
    orders: Sequence[int], rdp: np.ndarray, delta: float, conversion: str = "improved"
) -> tuple[float, int]:
    """Smallest epsilon over ``orders`` for the given ``delta``, and the order that gives it.

    ``classic``: ``rdp + log(1/delta)/(a-1)`` (Mironov 2017, Prop. 3).
    ``improved``: ``rdp + log((a-1)/a) - (log delta + log a)/(a-1)`` (Balle et al.
    2020, Thm. 21; what Opacus and TF-Privacy report), never larger than classic.
    """
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    if conversion == "classic":
        eps = rdp + math.log(1 / delta) / (a - 1)
    elif conversion == "improved":
        eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    else:
        raise ConfigError(f"unknown RDP conversion {conversion!r}; use 'improved' or 'classic'")
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), int(a[best])


class RDPAccountant:
    """Accumulates RDP over rounds (each may have its own sample rate and noise)."""

    def __init__(self, orders: Sequence[int] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(int(a) for a in orders)
        self.rdp = np.zeros(len(self.orders), dtype=np.float64)
        self.steps = 0

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        self.rdp = self.rdp + compute_rdp(sample_rate, noise_multiplier, num_steps, self.orders)
        self.steps += num_steps

    def get_privacy_spent(self, delta: float, conversion: str = "improved") -> tuple[float, int]:
        """(epsilon, best order) so far."""
        if self.steps == 0:
            return 0.0, self.orders[0]
        return rdp_to_epsilon(self.orders, self.rdp, delta, conversion)

    def get_epsilon(self, delta: float, conversion: str = "improved") -> float:
        return self.get_privacy_spent(delta, conversion)[0]


def global_norm(update: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update))


def clip_update(update: Sequence[torch.Tensor], clip_norm: float) -> Parameters:
    """``update * min(1, clip_norm / ||update||_2)`` with the norm over all tensors."""
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [t * scale for t in update]


def add_gaussian_noise(
    update: Sequence[torch.Tensor], std: float, generator: torch.Generator
) -> Parameters:
    """``update + N(0, std^2)`` on every coordinate."""
    return [
        t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
        for t in update
    ]


class DifferentialPrivacy(Strategy):
    """Wrap a strategy with DP-FedAvg clipping, noise and accounting.

    The server averages the clipped (and, locally, noised) updates uniformly
    over the sampled clients (uniform weights keep the sensitivity at C) and
    gives the inner strategy that one noisy update. Sampling, evaluation and
    the inner strategy's client hooks are delegated. ``seed`` makes the server
    noise reproducible; torch's generator is not a cryptographic source.
    """

    name = "dp"

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        mode: str = "central",
        delta: float = 1e-5,
        seed: int = 0,
    ) -> None:
        # The wrapper samples through the inner strategy, so it reports the inner minimums
        # (a server waits for min_fit_clients of the wrapper).
        super().__init__(
            fraction_fit=strategy.fraction_fit,
            min_fit_clients=strategy.min_fit_clients,
            fraction_evaluate=strategy.fraction_evaluate,
            min_evaluate_clients=strategy.min_evaluate_clients,
            min_available_clients=strategy.min_available_clients,
        )
        require(clip_norm > 0, f"dp option clip_norm must be > 0, got {clip_norm}")
        require(
            noise_multiplier >= 0,
            f"dp option noise_multiplier must be >= 0, got {noise_multiplier}",
        )
        require(
            mode in ("central", "local"), f"dp option mode must be central or local, got {mode!r}"
        )
        require(0 < delta < 1, f"dp option delta must be in (0, 1), got {delta}")
        self.strategy = strategy
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.mode = mode
        self.delta = delta
        self.accountant = RDPAccountant()
        self.generator = torch.Generator().manual_seed(seed)
        self._sampled = 0
        self._sample_rate = 1.0

    def configure_fit(
        self, server_round: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        chosen = self.strategy.configure_fit(server_round, available_client_ids, rng)
        self.record_sampling(len(chosen), len(available_client_ids))
        return chosen

    def record_sampling(self, num_sampled: int, num_available: int) -> None:
        self._sampled = num_sampled
        self._sample_rate = num_sampled / num_available if num_available else 1.0

    def configure_evaluate(
        self, server_round: int, available_client_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        return self.strategy.configure_evaluate(server_round, available_client_ids, rng)

    def fit_config(self, server_round: int) -> dict[str, ConfigValue]:
        config = dict(self.strategy.fit_config(server_round))
        if self.mode == "local":
            config.update(dp_clip_norm=self.clip_norm, dp_noise_multiplier=self.noise_multiplier)
        return config

    def aggregate_fit(
        self, server_round: int, results: Sequence[FitResult], current: Parameters
    ) -> Parameters:
        if not results:
            return unchanged(current)
        clipped = [
            r.update(current)
            if self.mode == "local"
            else clip_update(r.update(current), self.clip_norm)
            for r in results
        ]
        total = [torch.stack(ts).sum(dim=0) for ts in zip(*clipped, strict=True)]
        return self.aggregate_sum(server_round, total, len(results), current)

    def aggregate_sum(
        self,
        server_round: int,
        total: Sequence[torch.Tensor],
        num_clients: int,
        current: Parameters,
    ) -> Parameters:
        """Noise, average and apply ``total``, the sum of ``num_clients`` clipped updates.

        The entry point when the server only learns the sum (secure aggregation):
        clients clip (and, in local mode, noise) their own updates.
        """
        if num_clients < 1:
            return unchanged(current)
        if self.mode == "central":
            total = add_gaussian_noise(
                total, self.noise_multiplier * self.clip_norm, self.generator
            )
        # Dividing by the sampled count, not the reporting count, keeps dropouts from
        # changing the scale that the noise was calibrated against.
        denom = max(self._sampled, num_clients)
        mean = [t / denom for t in total]
        self.accountant.step(self.noise_multiplier, self._sample_rate)
        noisy = FitResult(client_id=-1, parameters=mean, num_examples=1, is_update=True)
        return self.strategy.aggregate_fit(server_round, [noisy], current)

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[EvaluateResult]
    ) -> dict[str, float]:
        return self.strategy.aggregate_evaluate(server_round, results)

    def client_loss_term(
        self, params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor]
    ) -> torch.Tensor | None:
        return self.strategy.client_loss_term(params, global_params)

    def client_correction(self, client_id: int, current: Parameters) -> Parameters | None:
        return self.strategy.client_correction(client_id, current)

    def client_update(self, update: Parameters, generator: torch.Generator) -> Parameters:
        update = self.strategy.client_update(update, generator)
        if self.mode != "local":
            return update
        clipped = clip_update(update, self.clip_norm)
        return add_gaussian_noise(clipped, self.noise_multiplier * self.clip_norm, generator)

    def privacy_spent(self) -> tuple[float, float]:
        """(epsilon, delta) after the rounds aggregated so far."""
        return self.accountant.get_epsilon(self.delta), self.delta

    def round_metrics(self) -> dict[str, float]:
        eps, delta = self.privacy_spent()
        return {"epsilon": eps, "delta": delta}

    def options(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "mode": self.mode,
            "delta": self.delta,
        }
