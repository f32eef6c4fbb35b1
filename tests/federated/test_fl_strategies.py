"""Each strategy against its formula on small hand-made inputs, plus sampling and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distml.errors import ConfigError
from distml.federated.strategies import (
    EvaluateResult,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedYogi,
    FitResult,
    Krum,
    MultiKrum,
    TrimmedMean,
    build_strategy,
    krum_scores,
    strategy_names,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _fit(cid: int, values: list[float], n: int = 1, update: bool = False) -> FitResult:
    return FitResult(cid, [_t(*values)], n, is_update=update)


def test_fedavg_weights_by_examples_and_mixes_weights_and_updates() -> None:
    current = [_t(1.0, 1.0)]
    results = [
        _fit(0, [2.0, 0.0], n=1),
        _fit(1, [4.0, 2.0], n=3),
        _fit(2, [-1.0, 1.0], n=2, update=True),  # update form: weights 0.0, 2.0
    ]
    new = FedAvg().aggregate_fit(1, results, current)
    expected = _t((2 * 1 + 4 * 3 + 0 * 2) / 6, (0 * 1 + 2 * 3 + 2 * 2) / 6)
    torch.testing.assert_close(new[0], expected)
    assert FedAvg().aggregate_fit(1, [], current)[0] is not current[0]


def test_fedprox_client_term_value_and_gradient() -> None:
    strategy = FedProx(mu=0.5)
    w = _t(1.0, 2.0).requires_grad_()
    g = _t(0.0, 4.0)
    term = strategy.client_loss_term([w], [g])
    assert term is not None
    assert float(term.detach()) == pytest.approx(0.5 / 2 * (1.0 + 4.0))
    (grad,) = torch.autograd.grad(term, [w])
    torch.testing.assert_close(grad, 0.5 * (w.detach() - g))
    assert strategy.fit_config(1) == {"proximal_mu": 0.5}
    assert FedAvg().client_loss_term([w], [g]) is None


def test_fedavgm_server_momentum_over_two_rounds() -> None:
    strategy = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    x0 = [_t(0.0)]
    x1 = strategy.aggregate_fit(1, [_fit(0, [2.0]), _fit(1, [4.0])], x0)
    # delta1 = 3, v = 3, x1 = 0 + 0.5 * 3
    torch.testing.assert_close(x1[0], _t(1.5))
    x2 = strategy.aggregate_fit(2, [_fit(0, [2.5])], x1)
    # delta2 = 1, v = 0.9 * 3 + 1 = 3.7, x2 = 1.5 + 0.5 * 3.7
    torch.testing.assert_close(x2[0], _t(1.5 + 0.5 * 3.7))


def _fedopt_reference(rule: str, deltas: list[float], eta: float, b1: float, b2: float, tau: float):
    """Scalar Reddi et al. 2021 Algorithm 2, written out independently."""
    x, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "adagrad":
            v = v + d * d
        elif rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    ("cls", "rule"), [(FedAdagrad, "adagrad"), (FedAdam, "adam"), (FedYogi, "yogi")]
)
def test_adaptive_server_optimizers_follow_reddi_et_al(cls: type, rule: str) -> None:
    opts = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    strategy = cls(**opts)
    x = [_t(0.0)]
    wanted_deltas = [0.5, -0.2, 0.3]
    for r, d in enumerate(wanted_deltas, start=1):
        # Two clients whose example-weighted mean update is d.
        x = strategy.aggregate_fit(r, [_fit(0, [d - 0.1], 1, True), _fit(1, [d + 0.1], 1, True)], x)
    expected = _fedopt_reference(rule, wanted_deltas, 0.1, 0.9, 0.99, 1e-3)
    assert float(x[0]) == pytest.approx(expected, rel=1e-9)
    assert strategy.fit_config(1) == {"lr": 0.1}


def test_fedmedian_odd_and_even() -> None:
    current = [_t(0.0, 0.0)]
    odd = [_fit(0, [1.0, 9.0]), _fit(1, [5.0, -3.0]), _fit(2, [100.0, 2.0])]
    torch.testing.assert_close(FedMedian().aggregate_fit(1, odd, current)[0], _t(5.0, 2.0))
    even = [*odd, _fit(3, [3.0, 4.0])]
    torch.testing.assert_close(FedMedian().aggregate_fit(1, even, current)[0], _t(4.0, 3.0))


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    current = [_t(0.0, 0.0)]
    results = [
        _fit(0, [1.0, 50.0]),
        _fit(1, [2.0, 10.0]),
        _fit(2, [3.0, 20.0]),
        _fit(3, [4.0, 30.0]),
        _fit(4, [-99.0, 40.0]),
    ]
    # beta 0.2 of 5 -> one dropped at each end of every coordinate.
    new = TrimmedMean(beta=0.2).aggregate_fit(1, results, current)
    torch.testing.assert_close(new[0], _t((1 + 2 + 3) / 3, (20 + 30 + 40) / 3))
    with pytest.raises(ConfigError, match="trimmed_mean option beta must be in"):
        TrimmedMean(beta=0.5)


def test_krum_scores_and_selection() -> None:
    points = [0.0, 1.0, 2.0, 10.0, 11.0]
    vectors = torch.tensor(points).unsqueeze(1)
    # n=5, f=1: each score sums the squared distances to the 2 nearest others.
    torch.testing.assert_close(
        krum_scores(vectors, 1), torch.tensor([5.0, 2.0, 5.0, 65.0, 82.0], dtype=torch.float64)
    )
    results = [_fit(i, [p], n=i + 1, update=True) for i, p in enumerate(points)]
    current = [_t(0.0)]
    krum = Krum(num_byzantine=1)
    torch.testing.assert_close(krum.aggregate_fit(1, results, current)[0], _t(1.0))
    assert krum.last_selected == [1]
    multi = MultiKrum(num_byzantine=1, num_selected=3)
    new = multi.aggregate_fit(1, results, current)
    assert multi.last_selected == [1, 0, 2]
    torch.testing.assert_close(new[0], _t((1.0 * 2 + 0.0 * 1 + 2.0 * 3) / 6))
    with pytest.raises(ConfigError, match="needs at least 7 clients per round, got 5"):
        Krum(num_byzantine=2).aggregate_fit(1, results, current)


def test_configure_fit_samples_by_fraction_and_minimum() -> None:
    rng = np.random.default_rng(0)
    ids = list(range(10))
    chosen = FedAvg(fraction_fit=0.5).configure_fit(1, ids, rng)
    assert len(chosen) == 5 and len(set(chosen)) == 5 and chosen == sorted(chosen)
    assert set(chosen) <= set(ids)
    assert len(FedAvg(fraction_fit=0.1, min_fit_clients=3).configure_fit(1, ids, rng)) == 3
    assert FedAvg(min_fit_clients=11).configure_fit(1, ids, rng) == []
    assert FedAvg(min_available_clients=20).configure_fit(1, ids, rng) == []
    draws = {tuple(FedAvg(fraction_fit=0.3).configure_fit(1, ids, rng)) for _ in range(20)}
    assert len(draws) > 1
    a = FedAvg(fraction_fit=0.3).configure_fit(1, ids, np.random.default_rng(7))
    b = FedAvg(fraction_fit=0.3).configure_fit(1, ids, np.random.default_rng(7))
    assert a == b


def test_aggregate_evaluate_weights_loss_and_common_metrics() -> None:
    results = [
        EvaluateResult(0, loss=1.0, num_examples=1, metrics={"accuracy": 0.5, "only_here": 1.0}),
        EvaluateResult(1, loss=4.0, num_examples=3, metrics={"accuracy": 0.9}),
    ]
    out = FedAvg().aggregate_evaluate(1, results)
    assert out == pytest.approx({"loss": (1.0 + 12.0) / 4, "accuracy": (0.5 + 2.7) / 4})
    assert FedAvg().configure_evaluate(1, [3, 1, 2], np.random.default_rng(0)) == [1, 2, 3]


def test_registry_builds_all_and_reports_one_line_errors() -> None:
    assert strategy_names() == sorted(
        [
            "fedavg",
            "fedprox",
            "fedavgm",
            "fedadam",
            "fedyogi",
            "fedadagrad",
            "fedmedian",
            "trimmed_mean",
            "krum",
            "multikrum",
            "scaffold",
        ]
    )
    for name in strategy_names():
        assert build_strategy(name).name == name
    strategy = build_strategy("fedprox", mu=1, fraction_fit=0.2)
    assert isinstance(strategy, FedProx) and strategy.mu == 1.0 and strategy.fraction_fit == 0.2
    with pytest.raises(
        ConfigError, match=r"^unknown federated strategy 'fedsgd'; choose one of: fedadagrad, "
    ):
        build_strategy("fedsgd")
    with pytest.raises(
        ConfigError, match=r"^unknown option 'num_selected' for strategy 'krum'; valid"
    ):
        build_strategy("krum", num_selected=2)
    with pytest.raises(
        ConfigError, match=r"^strategy 'fedadam' option eta must be float, got 'big'$"
    ):
        build_strategy("fedadam", eta="big")
    with pytest.raises(ConfigError, match=r"^fedprox option mu must be >= 0, got -1.0$"):
        build_strategy("fedprox", mu=-1)
    with pytest.raises(
        ConfigError, match=r"^fedavg option fraction_fit must be in \(0, 1\], got 0.0$"
    ):
        build_strategy("fedavg", fraction_fit=0.0)
