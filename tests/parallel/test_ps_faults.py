"""Faults at the protocol level: two independent ps jobs in one 5-rank spawn.

Job A (ranks 0, 1 workers, rank 2 server; ssp, staleness 2): worker 1 is slow
and its process ends abruptly after 4 steps (no DONE). The server notices the
closed connection, drops it, and worker 0 finishes all its steps; the SSP
bound holds while both were alive and the fast worker really ran ahead.
Job B (rank 3 worker, rank 4 server): the server process ends after 2 rounds;
the worker stops with a clear ParameterServerLost message.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from distml.parallel.ps import (
    ParameterServer,
    ParameterServerLost,
    PSClient,
    Shard,
    plan_shards,
)
from distml.parallel.ps import transport as wire
from distml.testing import run_ranks

STEPS = 12
STALENESS = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(client: PSClient, model: nn.Module, steps: int, pause: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        client.push_pull()
        model.zero_grad(set_to_none=True)
        time.sleep(pause)


def _job_a(rank: int) -> dict[str, Any]:
    model = _model()
    named = list(model.named_parameters())
    plan = plan_shards(named, 1)
    params = [p for _, p in named]
    if rank == 2:
        shard = Shard(plan, 0, params, torch.optim.SGD(params, lr=0.1), torch.device("cpu"))
        server = ParameterServer(
            plan, 0, [0, 1], shard, lambda t: [0.1], "ssp", STALENESS, final_step=STEPS
        )
        summary = server.serve()
        return {"summary": summary, "arrivals": server.stats.arrivals}
    client = PSClient(plan, params, [2], seed=rank)
    if rank == 1:
        _train(client, model, 4, pause=0.3, seed=rank)
        return {"steps": client.steps}  # gone: no DONE, the process exits
    _train(client, model, STEPS, pause=0.0, seed=rank)
    client.close()
    return {"steps": client.steps}


def _job_b(rank: int) -> dict[str, Any]:
    model = _model()
    named = list(model.named_parameters())
    plan = plan_shards(named, 1)
    params = [p for _, p in named]
    if rank == 4:
        # A server that serves two rounds by hand and then its process ends.
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        template = PSClient(plan, params, [4]).templates[0]
        for _ in range(2):
            wire.recv_header(3, torch.device("cpu"))
            wire.recv_payload(template, 3, torch.device("cpu"))
            wire.send_header([wire.OK, 0, 1, 0], 3, torch.device("cpu"))
            torch.distributed.send(flat, 3)
        return {"served": 2}
    client = PSClient(plan, params, [4], seed=rank)
    try:
        _train(client, model, STEPS, pause=0.0, seed=rank)
    except ParameterServerLost as exc:
        return {"error": str(exc), "steps": client.steps}
    return {"error": "", "steps": client.steps}


def _both_jobs(rank: int, world: int) -> dict[str, Any]:
    return _job_a(rank) if rank < 3 else _job_b(rank)


def test_lost_worker_is_dropped_and_lost_server_stops_workers_clearly() -> None:
    results = run_ranks(_both_jobs, 5, timeout=150)
    # Job A: the survivor finished every step; the server dropped worker 1.
    assert results[0]["steps"] == STEPS
    assert results[1]["steps"] == 4
    summary = results[2]["summary"]
    assert summary["ps_dropped_workers"] == [1]
    assert summary["ps_updates"] == STEPS + 4
    # A worker pushing step c was released after step c-1, when it was <= s ahead of the
    # slowest live worker (recorded on arrival, independently of the gate that enforces it).
    arrivals = results[2]["arrivals"]
    assert all(step - 1 - slowest <= STALENESS for _, step, slowest in arrivals)
    # The fast worker really ran ahead to the bound (the slow one sleeps 0.3 s a step).
    assert max(step - 1 - slowest for w, step, slowest in arrivals if w == 0) == STALENESS
    assert summary["ps_max_gap"] == STALENESS
    # Job B: the worker stopped after the 2 served steps, naming the lost server.
    assert results[3]["steps"] == 2
    assert results[3]["error"].startswith("parameter server 0 (rank 4) is unreachable (")
    assert results[3]["error"].endswith("its parameter shard is lost, so the job stops")
