"""Simulation: the vmapped path equals the sequential reference; robust and private runs."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from distml.errors import ConfigError
from distml.federated.parameters import num_bytes
from distml.federated.partition import dirichlet_partition, iid_partition
from distml.federated.privacy import DifferentialPrivacy, RDPAccountant
from distml.federated.simulation import History, simulate
from distml.federated.strategies import FedAvg, FitResult, Krum, build_strategy

Split = tuple[torch.Tensor, torch.Tensor]


def _assert_same_history(a: History, b: History) -> None:
    for p, q in zip(a.parameters, b.parameters, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        assert ra.clients == rb.clients
        assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-5)
        assert (ra.test_loss is None) == (rb.test_loss is None)
        if ra.test_loss is not None:
            assert ra.test_loss == pytest.approx(rb.test_loss, rel=1e-5)


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedprox"])
def test_vmap_equals_sequential_on_uneven_clients(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module], strategy_name: str
) -> None:
    train, test = digits
    # Dirichlet sizes differ a lot: short last batches and clients that finish early.
    parts = dirichlet_partition(train[1].numpy(), 30, alpha=0.5, seed=1)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]
    histories = [
        simulate(
            mlp_fn,
            train,
            parts,
            build_strategy(strategy_name, **({"mu": 0.5} if strategy_name == "fedprox" else {})),
            rounds=3,
            clients_per_round=8,
            local_epochs=2,
            batch_size=16,
            lr=0.1,
            seed=4,
            mode=mode,
            test=test,
        )
        for mode in ("vmap", "sequential")
    ]
    _assert_same_history(*histories)
    assert histories[0].parameters[0].abs().sum() > 0


class _Tied(nn.Module):
    """Two layers sharing one weight matrix, as GPT ties its embedding and head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_vmap_equals_sequential_with_tied_weights(digits: tuple[Split, Split]) -> None:
    train, _ = digits
    parts = iid_partition(300, 10, seed=0)
    small = (train[0][:300], train[1][:300])
    runs = [
        simulate(
            _Tied,
            small,
            parts,
            FedAvg(),
            rounds=2,
            clients_per_round=4,
            batch_size=8,
            lr=0.1,
            seed=1,
            mode=mode,
        )
        for mode in ("vmap", "sequential")
    ]
    _assert_same_history(*runs)
    names = list(_Tied().state_dict())
    final = dict(zip(names, runs[0].parameters, strict=True))
    assert torch.equal(final["a.weight"], final["b.weight"])


def test_history_reports_accuracy_bytes_and_loss(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module]
) -> None:
    train, test = digits
    parts = iid_partition(len(train[0]), 20, seed=0)
    seen = []
    history = simulate(
        mlp_fn,
        train,
        parts,
        FedAvg(fraction_fit=0.25),
        rounds=8,
        local_epochs=2,
        batch_size=16,
        lr=0.2,
        seed=0,
        test=test,
        on_round=seen.append,
    )
    assert [r.round for r in history.rounds] == list(range(1, 9)) and seen == history.rounds
    assert all(len(r.clients) == 5 for r in history.rounds)
    model_bytes = num_bytes(history.parameters)
    assert model_bytes == (64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10) * 4
    assert all(r.bytes_down == r.bytes_up == 5 * model_bytes for r in history.rounds)
    assert history.rounds[-1].train_loss < history.rounds[0].train_loss
    assert history.final_accuracy is not None and history.final_accuracy > 0.8
    assert set(history.to_dict()["rounds"][0]) >= {"test_accuracy", "bytes_up", "seconds"}


def _byzantine(client: int) -> Callable[[FitResult], FitResult]:
    gen = torch.Generator().manual_seed(0)

    def attack(result: FitResult) -> FitResult:
        if result.client_id != client:
            return result
        huge = [1e4 * torch.randn(p.shape, generator=gen) for p in result.parameters]
        return dataclasses.replace(result, parameters=huge, is_update=True)

    return attack


def test_krum_survives_a_byzantine_client_that_breaks_fedavg(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module]
) -> None:
    train, test = digits
    parts = iid_partition(len(train[0]), 10, seed=0)
    common = dict(
        rounds=12,
        clients_per_round=10,
        local_epochs=5,
        batch_size=16,
        lr=0.1,
        seed=0,
        test=test,
        transform_results=_byzantine(client=3),
    )
    robust = Krum(num_byzantine=1)
    krum = simulate(mlp_fn, train, parts, robust, **common)
    assert krum.final_accuracy is not None and krum.final_accuracy >= 0.85
    assert 3 not in robust.last_selected
    naive = simulate(mlp_fn, train, parts, FedAvg(), **{**common, "rounds": 3})
    assert naive.final_accuracy is not None and naive.final_accuracy < 0.5


def test_dp_run_reports_growing_epsilon(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module]
) -> None:
    train, test = digits
    parts = iid_partition(len(train[0]), 50, seed=0)
    strategy = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=1.1)
    history = simulate(
        mlp_fn,
        train,
        parts,
        strategy,
        rounds=4,
        clients_per_round=10,
        batch_size=16,
        lr=0.1,
        seed=0,
        test=test,
    )
    eps = [r.metrics["epsilon"] for r in history.rounds]
    assert all(b > a > 0 for a, b in itertools.pairwise(eps))
    reference = RDPAccountant()
    reference.step(1.1, 10 / 50, num_steps=4)
    assert eps[-1] == pytest.approx(reference.get_epsilon(1e-5))


def test_simulate_rejects_bad_arguments(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module]
) -> None:
    train, _ = digits
    parts = iid_partition(len(train[0]), 5, seed=0)
    with pytest.raises(ConfigError, match="unknown simulation mode 'threads'"):
        simulate(mlp_fn, train, parts, FedAvg(), rounds=1, mode="threads")
    with pytest.raises(ConfigError, match=r"clients_per_round must be in 1..5 \(the number"):
        simulate(mlp_fn, train, parts, FedAvg(), rounds=1, clients_per_round=6)
    with pytest.raises(ConfigError, match="partitions must index into it"):
        simulate(mlp_fn, (train[0][:100], train[1][:100]), parts, FedAvg(), rounds=1)
    with pytest.raises(ConfigError, match="every client partition must hold at least one sample"):
        simulate(mlp_fn, train, [*parts, np.array([], dtype=np.int64)], FedAvg(), rounds=1)

    def bn_model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))

    with pytest.raises(ConfigError, match="vmap simulation cannot train BatchNorm"):
        simulate(bn_model, train, parts, FedAvg(), rounds=1)
    with pytest.raises(ConfigError, match="sampled no clients from 5"):
        simulate(mlp_fn, train, parts, FedAvg(min_fit_clients=6), rounds=1)


def test_secure_aggregation_gives_the_same_model_as_plain_fedavg(
    digits: tuple[Split, Split], mlp_fn: Callable[[], nn.Module]
) -> None:
    train, _ = digits
    parts = dirichlet_partition(train[1].numpy(), 12, alpha=1.0, seed=0)
    runs = [
        simulate(
            mlp_fn,
            train,
            parts,
            build_strategy("fedavgm"),
            rounds=2,
            clients_per_round=6,
            batch_size=32,
            lr=0.1,
            seed=2,
            secure_aggregation=threshold,
        )
        for threshold in (None, 4)
    ]
    for p, q in zip(runs[0].parameters, runs[1].parameters, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    dim = sum(p.numel() for p in runs[0].parameters)
    assert runs[1].rounds[0].bytes_up == 6 * 8 * (dim + 1)
    with pytest.raises(ConfigError, match="strategy 'krum' needs individual client updates"):
        simulate(mlp_fn, train, parts, Krum(), rounds=1, secure_aggregation=4)
    with pytest.raises(
        ConfigError, match=r"threshold must be in 2..3 \(clients per round\), got 4"
    ):
        simulate(
            mlp_fn, train, parts, FedAvg(), rounds=1, clients_per_round=3, secure_aggregation=4
        )


def test_local_dp_and_dropout_models_run_in_vmap_mode(digits: tuple[Split, Split]) -> None:
    train, test = digits

    def dropout_mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))

    parts = iid_partition(len(train[0]), 10, seed=0)
    strategy = DifferentialPrivacy(FedAvg(), clip_norm=5.0, noise_multiplier=0.01, mode="local")
    history = simulate(
        dropout_mlp,
        train,
        parts,
        strategy,
        rounds=5,
        clients_per_round=5,
        local_epochs=2,
        batch_size=16,
        lr=0.2,
        seed=0,
        test=test,
    )
    assert history.final_accuracy is not None and history.final_accuracy > 0.5
    assert history.rounds[-1].metrics["epsilon"] > history.rounds[0].metrics["epsilon"]
