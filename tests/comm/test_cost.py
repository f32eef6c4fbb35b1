"""Alpha-beta formulas on hand-computed cases, algorithm choice, and the ping-pong fit."""

from __future__ import annotations

import math

import pytest

from distml.comm.cost import (
    LinkModel,
    best_all_reduce_algorithm,
    fit_link_model,
    halving_doubling_all_reduce_time,
    hierarchical_all_reduce_time,
    measure_alpha_beta,
    naive_all_reduce_time,
    ping_pong_times,
    predict_all_reduce_time,
    ring_all_reduce_time,
    tree_all_reduce_time,
)
from distml.errors import ConfigError, UserError
from distml.testing import run_ranks

LINK = LinkModel(alpha=1e-5, beta=1e-9)  # 10 us latency, 1 GB/s
N = 1e6  # bytes


def test_ring_formula() -> None:
    # 2*3*1e-5 + 2*3/4 * 1e6 * 1e-9
    assert ring_all_reduce_time(N, 4, LINK) == pytest.approx(6e-5 + 1.5e-3)
    assert ring_all_reduce_time(N, 1, LINK) == 0.0


def test_halving_doubling_formula_power_of_two_and_folded() -> None:
    # p=4: 2*log2(4)*1e-5 + 2*3/4*1e-3
    assert halving_doubling_all_reduce_time(N, 4, LINK) == pytest.approx(4e-5 + 1.5e-3)
    # p=6 folds 2 ranks into q=4: the p=4 cost plus 2*(1e-5 + 1e-3)
    assert halving_doubling_all_reduce_time(N, 6, LINK) == pytest.approx(2.02e-3 + 1.54e-3)


def test_tree_and_naive_formulas() -> None:
    # 2*ceil(log2 p)*(1e-5 + 1e-3): p=4 -> 2 levels, p=5 -> 3 levels
    assert tree_all_reduce_time(N, 4, LINK) == pytest.approx(4 * 1.01e-3)
    assert tree_all_reduce_time(N, 5, LINK) == pytest.approx(6 * 1.01e-3)
    assert naive_all_reduce_time(N, 4, LINK) == pytest.approx(6 * 1.01e-3)


def test_hierarchical_formula() -> None:
    intra, inter = LinkModel(1e-6, 1e-10), LinkModel(1e-5, 1e-9)
    # intra: 2*log2(4)*(1e-6 + 1e-4) = 4.04e-4; inter ring over 2 leaders: 2e-5 + 1e-3
    assert hierarchical_all_reduce_time(N, 2, 4, intra, inter) == pytest.approx(4.04e-4 + 1.02e-3)
    # one host: only the intra-host tree remains
    assert hierarchical_all_reduce_time(N, 1, 4, intra, inter) == pytest.approx(4.04e-4)


def test_hierarchical_beats_flat_ring_on_slow_network() -> None:
    intra, inter = LinkModel(2e-6, 1e-11), LinkModel(5e-5, 1e-9)
    flat = ring_all_reduce_time(N, 32, inter)  # a flat ring pays the slow link on every step
    assert hierarchical_all_reduce_time(N, 4, 8, intra, inter) < flat


def test_algorithm_choice_follows_latency_and_bandwidth() -> None:
    latency_bound = LinkModel(alpha=1e-3, beta=1e-12)
    assert best_all_reduce_algorithm(64, 8, latency_bound) == "halving_doubling"
    # Non-power-of-two world and a big message: folding costs 2 full messages, the ring wins.
    assert best_all_reduce_algorithm(1e8, 6, LINK) == "ring"
    assert predict_all_reduce_time("tree", N, 4, LINK) == tree_all_reduce_time(N, 4, LINK)
    with pytest.raises(ConfigError, match="no cost formula for 'bogus'"):
        predict_all_reduce_time("bogus", N, 4, LINK)
    with pytest.raises(UserError, match="need world size >= 1"):
        ring_all_reduce_time(N, 0, LINK)


def test_fit_recovers_exact_line_and_floors_negative_values() -> None:
    exact = [(n, 2e-5 + 3e-9 * n) for n in (8, 1024, 65536, 1 << 20)]
    model = fit_link_model(exact)
    assert model.alpha == pytest.approx(2e-5, rel=1e-6)
    assert model.beta == pytest.approx(3e-9, rel=1e-6)
    assert model.time(1e6) == pytest.approx(2e-5 + 3e-3, rel=1e-6)
    assert model.bandwidth == pytest.approx(1 / 3e-9, rel=1e-6)
    # Times that fall with size fit a negative slope, which is floored, not returned.
    assert fit_link_model([(1, 2e-5), (1000, 1e-5)]).beta == 1e-12
    with pytest.raises(UserError, match="two or more message sizes"):
        fit_link_model([(8, 1e-5), (8, 2e-5)])


SIZES = (8, 256, 4096, 65536, 1 << 18, 1 << 20)


def _measure(rank: int, world: int) -> tuple[list[tuple[int, float]], LinkModel]:
    return ping_pong_times(sizes=SIZES), measure_alpha_beta(sizes=SIZES)


def test_measure_alpha_beta_on_loopback() -> None:
    (samples, model), (peer_samples, peer_model) = run_ranks(_measure, 2, timeout=60)
    assert model == peer_model  # every rank gets the measuring rank's fit
    assert math.isfinite(model.alpha) and model.alpha > 0
    assert math.isfinite(model.beta) and model.beta > 0
    assert [n for n, _ in samples] == list(SIZES)
    assert peer_samples == []  # the echoing peer's waits are not round trips
    # On a shared 2-core host a wake-up can land on a 2-4 ms scheduler tick even in the
    # fastest of 20 trials, so one size may be an outlier; the fitted line must still
    # predict the typical sample within 3x and every sample within 100x.
    fitted = fit_link_model(samples)
    ratios = sorted(abs(math.log(fitted.time(n) / t)) for n, t in samples)
    assert ratios[len(ratios) // 2] < math.log(3), (samples, fitted)
    assert ratios[-1] < math.log(100), (samples, fitted)


def test_measure_needs_an_initialized_group() -> None:
    with pytest.raises(UserError, match=r"torch\.distributed is not initialized"):
        measure_alpha_beta()
