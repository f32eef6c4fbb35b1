"""RDP accountant against published reference values and closed forms; DP-FedAvg mechanics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distml.errors import ConfigError
from distml.federated.privacy import (
    DifferentialPrivacy,
    RDPAccountant,
    clip_update,
    compute_rdp,
    global_norm,
    rdp_to_epsilon,
)
from distml.federated.strategies import FedAvg, FitResult


def test_rdp_matches_tensorflow_privacy_reference_values() -> None:
    # Values from TF-Privacy's rdp_accountant tests (integer orders only).
    assert compute_rdp(0.1, 2.0, 10, [5])[0] == pytest.approx(0.07737, abs=1e-5)
    got = compute_rdp(0.01, 2.5, 50, [5, 50, 100])
    np.testing.assert_allclose(got, [0.00218075, 0.023846, 167.416307], atol=1e-5)


def test_rdp_closed_forms() -> None:
    # q = 1: the plain Gaussian mechanism, RDP(alpha) = alpha / (2 sigma^2) per step.
    orders = [2, 3, 10, 64]
    np.testing.assert_allclose(
        compute_rdp(1.0, 1.3, 7, orders), [7 * a / (2 * 1.3**2) for a in orders], rtol=1e-12
    )
    # alpha = 2: A_2 = 1 + q^2 (e^{1/sigma^2} - 1).
    q, sigma = 0.05, 0.8
    assert compute_rdp(q, sigma, 1, [2])[0] == pytest.approx(
        math.log1p(q * q * math.expm1(1 / sigma**2)), rel=1e-10
    )
    # alpha = 3 written out from the binomial expansion.
    a3 = (1 - q) ** 3 + 3 * (1 - q) ** 2 * q + 3 * (1 - q) * q**2 * math.exp(1 / sigma**2)
    a3 += q**3 * math.exp(3 / sigma**2)
    assert compute_rdp(q, sigma, 1, [3])[0] == pytest.approx(math.log(a3) / 2, rel=1e-10)
    assert compute_rdp(0.0, 1.0, 5, [2])[0] == 0.0


def test_epsilon_matches_reference_and_improved_conversion_is_tighter() -> None:
    orders = list(range(2, 33))
    rdp = compute_rdp(0.01, 4.0, 10000, orders)
    # TF-Privacy reference: eps = 1.258575 at order 20 with the classic conversion.
    eps, order = rdp_to_epsilon(orders, rdp, 1e-5, "classic")
    assert eps == pytest.approx(1.258575, abs=1e-5) and order == 20
    improved, best = rdp_to_epsilon(orders, rdp, 1e-5, "improved")
    a = best
    by_hand = rdp[a - 2] + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
    assert improved == pytest.approx(by_hand) and improved < eps


def _gaussian_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of a Gaussian mechanism with sensitivity/sigma = mu (Balle-Wang 2018)."""

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def test_full_participation_epsilon_is_a_valid_and_tight_gaussian_bound() -> None:
    sigma, steps, delta = 2.0, 16, 1e-5
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    eps = acc.get_epsilon(delta)
    mu = math.sqrt(steps) / sigma
    assert _gaussian_delta(eps, mu) <= delta  # RDP gives an upper bound on the true epsilon
    lo, hi = 0.0, eps
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, mu) > delta else (lo, mid)
    assert eps < 1.25 * hi  # and a close one


def test_accountant_accumulates_rounds() -> None:
    acc = RDPAccountant(orders=[2, 8, 32])
    for _ in range(5):
        acc.step(1.1, 0.01)
    np.testing.assert_allclose(acc.rdp, compute_rdp(0.01, 1.1, 5, [2, 8, 32]), rtol=1e-12)
    eps = [acc.get_epsilon(1e-5)]
    acc.step(1.1, 0.01, num_steps=100)
    eps.append(acc.get_epsilon(1e-5))
    assert eps[1] > eps[0] > 0
    with pytest.raises(ConfigError, match="RDP orders must be integers >= 2"):
        compute_rdp(0.1, 1.0, 1, [1.5])


def test_clip_update_scales_to_the_norm_bound() -> None:
    update = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    clipped = clip_update(update, 1.0)
    assert global_norm(clipped) == pytest.approx(1.0)
    torch.testing.assert_close(clipped[0], torch.tensor([0.6, 0.0]))
    same = clip_update(update, 10.0)
    torch.testing.assert_close(same[1], update[1])


def test_central_dp_averages_clipped_updates_and_adds_calibrated_noise() -> None:
    current = [torch.zeros(20000, dtype=torch.float64)]
    big = torch.zeros(20000, dtype=torch.float64)
    big[0] = 10.0
    results = [
        FitResult(0, [big], 1, is_update=True),
        FitResult(1, [big * 0.01], 500, is_update=True),
    ]
    quiet = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=0.0)
    quiet.record_sampling(2, 10)
    out = quiet.aggregate_fit(1, results, current)
    assert float(out[0][0]) == pytest.approx((1.0 + 0.1) / 2)  # clipped, uniform weights
    noisy = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=2.0, seed=3)
    noisy.record_sampling(2, 10)
    zeros = [
        FitResult(c, [torch.zeros(20000, dtype=torch.float64)], 1, is_update=True) for c in (0, 1)
    ]
    out = noisy.aggregate_fit(1, zeros, current)
    assert float(out[0].std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.03)
    eps, delta = noisy.privacy_spent()
    expected, _ = rdp_to_epsilon(
        noisy.accountant.orders, compute_rdp(0.2, 2.0, 1, noisy.accountant.orders), 1e-5
    )
    assert delta == 1e-5 and eps == pytest.approx(expected)
    assert noisy.round_metrics() == {"epsilon": eps, "delta": 1e-5}


def test_local_dp_noises_on_the_client_not_the_server() -> None:
    strategy = DifferentialPrivacy(FedAvg(), clip_norm=0.5, noise_multiplier=1.0, mode="local")
    update = [torch.full((10000,), 1.0)]
    private = strategy.client_update(update, torch.Generator().manual_seed(0))
    clipped_mean = 0.5 / math.sqrt(10000)
    assert float(private[0].mean()) == pytest.approx(clipped_mean, abs=0.02)
    assert float(private[0].std()) == pytest.approx(0.5, rel=0.05)
    assert strategy.fit_config(1) == {"dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0}
    current = [torch.zeros(3)]
    results = [FitResult(0, [torch.tensor([1.0, 2.0, 3.0])], 1, is_update=True)]
    strategy.record_sampling(1, 4)
    out = strategy.aggregate_fit(1, results, current)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2.0, 3.0]))  # server adds nothing
    with pytest.raises(ConfigError, match="dp option mode must be central or local"):
        DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, mode="both")
