"""SCAFFOLD: the server step against the paper's formulas, and the simulation against a
hand-written reference loop (explicit ``y <- y - lr (g + c - c_i)`` steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distml.errors import ConfigError
from distml.federated import simulate
from distml.federated.simulation import round_plans
from distml.federated.strategies import FitResult, Scaffold, build_strategy, sample_clients


def test_server_step_matches_option_two_formulas() -> None:
    strategy = build_strategy("scaffold", server_lr=0.5)
    assert isinstance(strategy, Scaffold)
    x = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    strategy.control = [torch.tensor([0.1, 0.2]), torch.tensor([-0.3])]
    strategy.client_controls[7] = [torch.tensor([0.4, 0.0]), torch.tensor([0.2])]
    strategy.record_sampling(2, 8)
    dy = {
        7: [torch.tensor([-0.2, 0.4]), torch.tensor([0.1])],
        9: [torch.tensor([0.6, 0.0]), torch.tensor([-0.3])],
    }
    steps, lr = {7: 4.0, 9: 2.0}, 0.1
    results = [
        FitResult(cid, d, 10, {"local_steps": steps[cid], "lr": lr}, is_update=True)
        for cid, d in dy.items()
    ]
    c = [t.clone() for t in strategy.control]
    c_i = {7: [t.clone() for t in strategy.client_controls[7]], 9: [torch.zeros(2), torch.zeros(1)]}
    # Client 9 is new: its correction before training is c - 0 = c.
    for got, want in zip(strategy.client_correction(9, x) or [], c, strict=True):
        torch.testing.assert_close(got, want)
    out = strategy.aggregate_fit(1, results, x)
    for j in range(2):
        new_ci = {k: c_i[k][j] - c[j] - dy[k][j] / (steps[k] * lr) for k in dy}
        torch.testing.assert_close(strategy.client_controls[7][j], new_ci[7])
        torch.testing.assert_close(strategy.client_controls[9][j], new_ci[9])
        mean_dc = sum(new_ci[k] - c_i[k][j] for k in dy) / 2
        torch.testing.assert_close(strategy.control[j], c[j] + 2 / 8 * mean_dc)
        torch.testing.assert_close(out[j], x[j] + 0.5 * (dy[7][j] + dy[9][j]) / 2)


def _reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    parts: list[np.ndarray],
    rounds: int,
    per_round: int,
    lr: float,
    seed: int,
) -> list[torch.Tensor]:
    """SCAFFOLD written out from the paper with the simulation's samples and batches."""
    w = [p.detach().clone() for p in model.parameters()]
    c = [torch.zeros_like(t) for t in w]
    c_local = {i: [torch.zeros_like(t) for t in w] for i in range(len(parts))}
    rng = np.random.default_rng(seed)
    for server_round in range(1, rounds + 1):
        chosen = sample_clients(list(range(len(parts))), per_round, rng)
        plans = round_plans(parts, chosen, 1, 4, seed, server_round)
        dys, dcs = [], []
        for plan in plans:
            k = plan.client_id
            yk = [t.clone().requires_grad_() for t in w]
            for step in range(len(plan.batches)):
                batch = plan.batch(step)
                loss = F.cross_entropy(F.linear(x[batch], yk[0], yk[1]), y[batch])
                grads = torch.autograd.grad(loss, yk)
                with torch.no_grad():
                    for t, g, cc, ci in zip(yk, grads, c, c_local[k], strict=True):
                        t -= lr * (g + cc - ci)
            steps = len(plan.batches)
            new_ci = [
                ci - cc + (wt - t.detach()) / (steps * lr)
                for ci, cc, wt, t in zip(c_local[k], c, w, yk, strict=True)
            ]
            dcs.append([n - o for n, o in zip(new_ci, c_local[k], strict=True)])
            c_local[k] = new_ci
            dys.append([t.detach() - wt for t, wt in zip(yk, w, strict=True)])
        w = [wt + sum(d[j] for d in dys) / len(dys) for j, wt in enumerate(w)]
        c = [
            ct + per_round / len(parts) * sum(d[j] for d in dcs) / len(dcs)
            for j, ct in enumerate(c)
        ]
    return w


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_simulation_equals_reference_scaffold(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    # Uneven clients, so some finish their local steps early in vmap mode.
    parts = [np.arange(a, b) for a, b in ((0, 7), (7, 20), (20, 29), (29, 45), (45, 60))]

    def model_fn() -> nn.Module:
        return nn.Linear(5, 3)

    history = simulate(
        model_fn,
        (x, y),
        parts,
        build_strategy("scaffold"),
        rounds=3,
        clients_per_round=3,
        batch_size=4,
        lr=0.3,
        seed=1,
        mode=mode,
    )
    torch.manual_seed(1)
    expected = _reference(model_fn(), x, y, parts, 3, 3, 0.3, 1)
    for got, want in zip(history.parameters, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # And SCAFFOLD is not plain FedAvg: the corrections changed the result.
    fedavg = simulate(
        model_fn,
        (x, y),
        parts,
        build_strategy("fedavg"),
        rounds=3,
        clients_per_round=3,
        batch_size=4,
        lr=0.3,
        seed=1,
        mode=mode,
    )
    assert not torch.allclose(fedavg.parameters[0], history.parameters[0], atol=1e-4)


def test_scaffold_results_need_step_counts() -> None:
    strategy = Scaffold()
    result = FitResult(0, [torch.ones(2)], 5, is_update=True)
    with pytest.raises(
        ConfigError, match="scaffold needs each client result's local_steps and lr metrics"
    ):
        strategy.aggregate_fit(1, [result], [torch.zeros(2)])
