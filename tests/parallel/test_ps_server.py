"""Server consistency logic, driven in-process by threads standing in for workers.

``ParameterServer._handle_push`` and ``_lost`` are what a worker's service
thread calls after receiving a push or seeing its connection break; calling
them from threads here exercises the sync rounds, SSP gating, the final
barrier and worker loss without any network.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from distml.parallel.ps import ParameterServer, Shard, plan_shards
from distml.parallel.ps import transport as wire


def _server(consistency: str, workers: int, staleness: int = 0, final: int | None = None):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
    plan = plan_shards([(f"p{i}", p) for i, p in enumerate(params)], 1)
    shard = Shard(plan, 0, params, torch.optim.SGD(params, lr=0.1), torch.device("cpu"))
    lrs = [0.1]
    server = ParameterServer(
        plan,
        0,
        list(range(workers)),
        shard,
        lambda t: lrs,
        consistency,
        staleness,
        final_step=final,
    )
    return server, params


def _pushes(server: ParameterServer, worker: int, steps: int, pause: float, out: dict) -> None:
    for step in range(steps):
        grad = torch.full((server.shard.numel,), float(worker + 1))
        status, _ = server._handle_push(worker, grad)
        out.setdefault(worker, []).append((status, time.monotonic()))
        if status != wire.OK:
            return
        time.sleep(pause * (step % 2 + 1))


def _run(server: ParameterServer, plan: dict[int, tuple[int, float]]) -> dict:
    out: dict = {}
    threads = [
        threading.Thread(target=_pushes, args=(server, w, n, pause, out))
        for w, (n, pause) in plan.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return out


def test_sync_round_applies_the_worker_average_once() -> None:
    server, _ = _server("sync", 2)
    before = server.shard.flat.clone()
    _run(server, {0: (1, 0.0), 1: (1, 0.05)})
    # SGD without momentum: one step with the mean of the pushed gradients (1 and 2).
    assert torch.equal(server.shard.flat, before.add(torch.full_like(before, 1.5), alpha=-0.1))
    assert server.stats.updates == 1 and server.rounds == 1


def test_ssp_bound_holds_and_is_reached_with_a_slow_worker() -> None:
    staleness = 2
    server, _ = _server("ssp", 3, staleness)
    _run(server, {0: (10, 0.0), 1: (10, 0.002), 2: (10, 0.03)})
    assert all(c - slowest <= staleness for _, c, slowest in server.stats.releases)
    assert all(c - 1 - slowest <= staleness for _, c, slowest in server.stats.arrivals)
    assert max(c - slowest for w, c, slowest in server.stats.releases if w == 0) == staleness
    assert server.stats.updates == 30


def test_async_does_not_wait_but_the_last_reply_waits_for_everyone() -> None:
    server, _ = _server("async", 2, final=6)
    out = _run(server, {0: (6, 0.0), 1: (6, 0.05)})
    # Worker 0 ran far ahead of worker 1 (no gating) ...
    assert max(c - slowest for w, c, slowest in server.stats.releases if w == 0) >= 3
    # ... but its final reply was released only once worker 1 had completed step 6 too.
    assert [r for r in server.stats.releases if r[0] == 0][-1] == (0, 6, 6)
    assert out[0][-1][0] == out[1][-1][0] == wire.OK


def test_lost_worker_in_sync_stops_the_waiting_workers_with_the_reason() -> None:
    server, _ = _server("sync", 2)
    out: dict = {}
    waiting = threading.Thread(target=_pushes, args=(server, 0, 3, 0.0, out))
    waiting.start()
    time.sleep(0.2)
    server._lost(1, RuntimeError("Connection closed by peer [127.0.0.1]:4242\nmore"))
    waiting.join(timeout=10)
    assert out[0] and out[0][0][0] == wire.STOPPED
    assert server.failure == (
        "worker rank 1 was lost (Connection closed by peer [127.0.0.1]:4242) and sync mode "
        "needs every worker; set parallel.consistency=async or ssp to continue without lost "
        "workers"
    )
    assert server.stats.dropped == [1] and server.stats.updates == 0


def test_lost_worker_in_ssp_releases_the_others() -> None:
    server, _ = _server("ssp", 2, staleness=0)
    out: dict = {}
    fast = threading.Thread(target=_pushes, args=(server, 0, 5, 0.0, out))
    fast.start()
    time.sleep(0.2)
    assert len(out.get(0, [])) == 0  # lockstep (s=0): blocked until worker 1 pushes
    server._lost(1, RuntimeError("Connection closed by peer"))
    fast.join(timeout=10)
    assert [status for status, _ in out[0]] == [wire.OK] * 5
    assert server.stats.dropped == [1] and not server.failure
