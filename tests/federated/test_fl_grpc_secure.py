"""Secure aggregation and differential privacy inside real gRPC rounds on loopback.

The server runs in a thread of the test process; every client is a
:class:`FederatedClient` with its own channel and stub in its own thread.
The reference is the same local training (same seeds, same shards) done
here, aggregated in the clear.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from distml.config import build_config
from distml.errors import ConfigError
from distml.federated.deploy import dataset_shard
from distml.federated.parameters import Parameters, get_parameters, set_parameters, subtract
from distml.federated.privacy import DifferentialPrivacy, RDPAccountant, clip_update
from distml.federated.strategies import FitResult, build_strategy
from distml.federated.transport import (
    FederatedClient,
    FederatedServer,
    ServerStore,
    fl_pb2_grpc,
    train_local,
)
from distml.federated.transport import fl_pb2 as pb
from distml.federated.transport.store import load_strategy_state, strategy_state
from distml.models import build_model
from distml.testing import free_port

CONFIG = {"seed": 0, "model": {"name": "mlp", "args": {"hidden": [16]}}, "data": {"name": "digits"}}


class _Crash(Exception):
    """Stands for a client process dying."""


class DropsAfterMasking(FederatedClient):
    """A client that uploads its masked input and then dies before the unmask step."""

    def _secure_step(self, task: Any, step: str, message: Any) -> Any:
        if step == "unmask":
            raise _Crash(self.name)
        return super()._secure_step(task, step, message)


def _settings(port: int, clients: int, **overrides: Any) -> dict[str, Any]:
    return {
        "address": f"127.0.0.1:{port}",
        "rounds": 1,
        "lr": 0.2,
        "batch_size": 32,
        "strategy_options": {"min_fit_clients": clients, "min_available_clients": clients},
        "round_timeout_s": 30.0,
        "secagg_timeout_s": 1.5,
        "poll_timeout_s": 0.5,
        "client_timeout_s": 5.0,
        "evaluate_every": 0,
        "server_evaluate": False,
        **overrides,
    }


@contextlib.contextmanager
def _job(
    state: Path, clients: Sequence[type[FederatedClient]], **settings: Any
) -> Iterator[list[dict[str, Any]]]:
    """Run a whole job; yields the round records."""
    port = free_port()
    cfg = build_config({**CONFIG, "federated": _settings(port, len(clients), **settings)})
    server = FederatedServer(cfg, state_dir=state)
    server.start()
    n = len(clients)
    workers = [
        kind(f"127.0.0.1:{port}", f"digits:{i}/{n}", name=f"c{i}", seed=i, reconnect_timeout_s=5)
        for i, kind in enumerate(clients)
    ]
    threads = [threading.Thread(target=_run_quietly, args=(w,), daemon=True) for w in workers]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.run)
        for t in threads:
            t.start()
        try:
            yield future.result(timeout=60)
        finally:
            server.stop()
            for t in threads:
                t.join(10)


def _run_quietly(client: FederatedClient) -> None:
    with contextlib.suppress(_Crash):
        client.run()


def _local_updates(initial: Parameters, n: int) -> list[tuple[Parameters, int]]:
    """What each client trains in round 1 (the client's own seed rule), in the clear."""
    out = []
    for i in range(n):
        data = dataset_shard("digits", i, n, data=CONFIG["data"], seed=0)
        model = build_model("mlp", {"hidden": [16], "in_features": 64, "num_classes": 10})
        set_parameters(model, initial)
        train_local(
            model,
            data.x,
            data.y,
            lr=0.2,
            epochs=1,
            batch_size=32,
            max_steps=None,
            seed=i * 100_003 + 1,
        )
        out.append((subtract(get_parameters(model), initial), len(data)))
    return out


def _rounds(state: Path) -> tuple[Parameters, Parameters]:
    store = ServerStore(state)
    try:
        return store.load_round(0)[0], store.load_round(1)[0]
    finally:
        store.close()


def test_secure_round_equals_fedavg_and_survives_a_client_dying_after_masking(
    tmp_path: Path,
) -> None:
    kinds = [FederatedClient, FederatedClient, FederatedClient, DropsAfterMasking]
    with _job(tmp_path, kinds, secagg_threshold=3) as records:
        pass
    record = records[-1]
    assert record["secure_aggregation"] is True
    # The dead client's masked input is in the sum: its self mask is rebuilt from shares.
    assert record["clients"] == ["c0", "c1", "c2", "c3"]
    initial, final = _rounds(tmp_path)
    updates = _local_updates(initial, 4)
    total = sum(n for _, n in updates)
    assert record["num_examples"] == total
    for i, (w0, w1) in enumerate(zip(initial, final, strict=True)):
        expected = w0.double() + sum(u[i].double() * n for u, n in updates) / total
        # Fixed point has 2^-24 resolution per client before the division by the count.
        torch.testing.assert_close(w1.double(), expected, atol=1e-6, rtol=0)
    # Each client uploaded one masked uint64 vector (plus keys and shares) and no plaintext.
    dim = sum(t.numel() for t in initial) + 3
    assert record["bytes_up"] > 4 * 8 * dim


def test_secure_round_with_dp_clips_on_clients_and_noises_the_sum(tmp_path: Path) -> None:
    clip, noise = 0.05, 1e-3
    with _job(
        tmp_path, [FederatedClient] * 3, secagg_threshold=2, dp_clip=clip, dp_noise=noise
    ) as records:
        pass
    initial, final = _rounds(tmp_path)
    clipped = [clip_update(u, clip) for u, _ in _local_updates(initial, 3)]
    for i, (w0, w1) in enumerate(zip(initial, final, strict=True)):
        # Uniform DP weights: the mean of the clipped updates, plus noise of std
        # noise * clip / 3 (about 2e-5) on every entry.
        expected = w0.double() + sum(u[i].double() for u in clipped) / 3
        torch.testing.assert_close(w1.double(), expected, atol=2e-4, rtol=0)
    reference = RDPAccountant()
    reference.step(noise, 1.0)
    assert records[-1]["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
    assert records[-1]["delta"] == 1e-5


def test_central_dp_in_deploy_mode_reports_epsilon_every_round(tmp_path: Path) -> None:
    with _job(
        tmp_path, [FederatedClient] * 2, rounds=2, dp_clip=1.0, dp_noise=1.2, dp_delta=1e-4
    ) as records:
        pass
    accountant = RDPAccountant()
    expected = []
    for _ in range(2):
        accountant.step(1.2, 1.0)  # 2 of 2 clients sampled
        expected.append(accountant.get_epsilon(1e-4))
    assert [r["epsilon"] for r in records] == pytest.approx(expected)
    assert expected[1] > expected[0] > 0


def test_secure_mode_rejects_strategies_that_need_single_updates(tmp_path: Path) -> None:
    port = free_port()
    for fed, message in (
        (
            {"strategy": "krum", "secagg_threshold": 2},
            "strategy 'krum' needs individual client updates, which federated.secagg_threshold "
            "hides; use a FedAvg-family strategy or set it to 0",
        ),
        (
            {"secagg_threshold": 3},
            "federated.secagg_threshold=3 needs 2 <= threshold <= min_fit_clients=2; raise "
            "strategy_options.min_fit_clients or lower the threshold",
        ),
    ):
        cfg = build_config({**CONFIG, "federated": {**_settings(port, 2), **fed}})
        with pytest.raises(ConfigError) as err:
            FederatedServer(cfg, state_dir=tmp_path / fed.get("strategy", "fedavg"))
        assert str(err.value) == message


def test_dp_wrapper_state_survives_a_server_restart() -> None:
    def make() -> DifferentialPrivacy:
        inner = build_strategy("fedadam")
        return DifferentialPrivacy(inner, clip_norm=1.0, noise_multiplier=1.0, seed=3)

    current = [torch.zeros(3)]
    before = make()
    before.record_sampling(2, 4)
    before.aggregate_fit(1, [FitResult(0, [torch.ones(3)], 1, is_update=True)], current)
    after = make()
    load_strategy_state(after, strategy_state(before))
    assert after.privacy_spent() == before.privacy_spent() and after.accountant.steps == 1
    for name in ("m", "v"):
        torch.testing.assert_close(getattr(after.strategy, name), getattr(before.strategy, name))


def test_malformed_or_stale_secagg_calls_get_one_line_errors(tmp_path: Path) -> None:
    port = free_port()
    cfg = build_config({**CONFIG, "federated": _settings(port, 2, secagg_threshold=2)})
    server = FederatedServer(cfg, state_dir=tmp_path)
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = fl_pb2_grpc.FederatedLearningStub(channel)
        stub.Join(pb.JoinRequest(client_name="eve"), timeout=5)
        calls = [
            (
                pb.SecAggRequest(client_name="eve", task_id="x"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "a SecAgg request must carry one protocol step",
            ),
            (
                pb.SecAggRequest(client_name="eve", task_id="x", masked=pb.SecAggMasked(data=b"1")),
                grpc.StatusCode.FAILED_PRECONDITION,
                "task 'x' is not open (its round closed or the server restarted); poll GetTask for "
                "a new one",
            ),
            (
                pb.SecAggRequest(client_name="mallory", task_id="x", keys=pb.SecAggKeys()),
                grpc.StatusCode.FAILED_PRECONDITION,
                "client 'mallory' has not joined; call Join first",
            ),
        ]
        for request, code, details in calls:
            with pytest.raises(grpc.RpcError) as err:
                stub.SecAgg(request, timeout=5)
            assert (err.value.code(), err.value.details()) == (code, details)
        channel.close()
    finally:
        server.stop()
