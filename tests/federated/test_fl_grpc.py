"""Federated learning over real gRPC on loopback: rounds, dropouts, restarts, bad input, TLS.

Process tests run the server and clients as separate processes (forked from a
forkserver that has torch and distml imported, so each starts in well under a
second) and kill and reap every one of them in the fixture's teardown. The
retry and compression tests run the server in a thread of the test process
and drive the wire protocol with raw stubs, which makes their timing exact.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import multiprocessing as mp
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from distml.config import build_config
from distml.errors import UserError
from distml.federated.config import FederatedSection
from distml.federated.transport import FederatedClient, FederatedServer, fl_pb2_grpc
from distml.federated.transport import fl_pb2 as pb
from distml.federated.transport.wire import encode_parameters, iter_chunks, make_encoder, sha256_hex
from distml.models import build_model
from distml.testing import free_port

CONFIG = {"seed": 0, "model": {"name": "mlp", "args": {"hidden": [64]}}, "data": {"name": "digits"}}
PRELOAD = [
    "torch",
    "torch._dynamo",
    "sklearn.datasets",
    "distml.models",
    "distml.data",
    "distml.federated.transport",
]


def _settings(port: int, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "address": f"127.0.0.1:{port}",
        "rounds": 4,
        "lr": 0.3,
        "local_epochs": 2,
        "strategy_options": {"min_fit_clients": 2, "min_available_clients": 2},
        "round_timeout_s": 20.0,
        "poll_timeout_s": 1.0,
        "client_timeout_s": 10.0,
        "client_wait_timeout_s": 60.0,
    }
    base.update(overrides)
    return base


# -- processes -----------------------------------------------------------------


def _redirect(log_path: str) -> None:
    import logging

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s", force=True
    )
    torch.set_num_threads(1)


def _server_main(settings: dict[str, Any], state_dir: str, log_path: str) -> None:
    _redirect(log_path)
    from distml.federated.transport import run_server

    run_server(build_config(CONFIG), FederatedSection(**settings), state_dir=state_dir)


def _client_main(
    port: int, data: str, name: str, out: str, log_path: str, token: str | None, cert: str | None
) -> None:
    _redirect(log_path)
    from distml.federated.transport import run_client

    host = "localhost" if cert else "127.0.0.1"
    summary = run_client(
        f"{host}:{port}",
        data=data,
        name=name,
        token=token,
        root_cert=cert,
        reconnect_timeout_s=30.0,
    )
    Path(out).write_text(json.dumps(asdict(summary)))


def _doomed_main(port: int, marker: str, log_path: str) -> None:
    """A client that takes a training task and then never answers (until it is killed)."""
    _redirect(log_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = fl_pb2_grpc.FederatedLearningStub(channel)
    _retry(lambda: stub.Join(pb.JoinRequest(client_name="doomed"), timeout=5))
    Path(marker + ".joined").touch()
    header, _ = _fetch_until(stub, "doomed", pb.FIT)
    Path(marker).write_text(json.dumps({"round": header.round, "task_id": header.task_id}))
    time.sleep(120)


class Procs:
    """Processes of one test: started from a preloaded forkserver, always killed and reaped."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.tmp = tmp_path
        self.procs: dict[str, Any] = {}

    def start(self, name: str, target: Any, *args: Any) -> None:
        proc = self.ctx.Process(target=target, args=(*args,), name=name, daemon=True)
        proc.start()
        self.procs[name] = proc

    def log(self, name: str) -> str:
        return str(self.tmp / f"{name}.log")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def wait(self, name: str, timeout: float) -> int:
        proc = self.procs[name]
        proc.join(timeout)
        if proc.exitcode is None:
            raise AssertionError(f"{name} still running after {timeout}s\n{self.logs()}")
        return int(proc.exitcode)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.join(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _wait_for(predicate: Any, timeout: float, what: str, procs: Procs | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{procs.logs() if procs else ''}")
        time.sleep(0.05)


def _records(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- raw protocol ----------------------------------------------------------------


def _retry(call: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _fetch(stub: Any, name: str, md: Sequence[tuple[str, str]] = ()) -> tuple[Any, bytes]:
    header, chunks = None, []
    for message in stub.GetTask(pb.TaskRequest(client_name=name), metadata=md, timeout=30):
        if message.WhichOneof("msg") == "header":
            header = message.header
        else:
            chunks.append(message.chunk)
    return header, b"".join(chunks)


def _fetch_until(
    stub: Any, name: str, kind: int, md: Sequence[tuple[str, str]] = (), timeout: float = 30.0
) -> tuple[Any, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        header, payload = _retry(lambda: _fetch(stub, name, md))
        if header.kind == kind:
            return header, payload
    raise AssertionError(f"{name} got no task of kind {kind} within {timeout}s")


def _submit(
    stub: Any,
    name: str,
    task_id: str,
    payload: bytes,
    md: Sequence[tuple[str, str]] = (),
    *,
    size: int | None = None,
    sha: str | None = None,
    chunk: int = 65536,
    chunks: Sequence[bytes] | None = None,
    header_first: bool = True,
) -> Any:
    header = pb.ResultHeader(
        client_name=name,
        task_id=task_id,
        num_examples=10,
        codec="none",
        payload_size=len(payload) if size is None else size,
        sha256=sha256_hex(payload) if sha is None else sha,
    )
    body = [pb.ResultMessage(chunk=c) for c in (chunks or list(iter_chunks(payload, chunk)))]
    head = [pb.ResultMessage(header=header)]
    messages = head + body if header_first else body + head
    return stub.SubmitResult(iter(messages), metadata=md, timeout=30)


def _update(hidden: int, scale: float = 0.0) -> bytes:
    model = build_model("mlp", {"in_features": 64, "hidden": [hidden], "num_classes": 10})
    zeros = [torch.full_like(t, scale) for t in model.state_dict().values()]
    return encode_parameters(zeros, make_encoder("none"))


def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# -- in-process server -------------------------------------------------------------


@contextlib.contextmanager
def _inproc_server(state_dir: Path, **settings: Any) -> Iterator[tuple[FederatedServer, Any]]:
    port = free_port()
    server = FederatedServer(
        build_config(CONFIG), FederatedSection(**_settings(port, **settings)), state_dir=state_dir
    )
    server.start()
    pool = ThreadPoolExecutor(1)
    future = pool.submit(server.run)
    try:
        yield server, future
    finally:
        server.stop()
        pool.shutdown(wait=True)


def test_round_is_retried_when_too_few_clients_answer(tmp_path: Path) -> None:
    with _inproc_server(
        tmp_path, rounds=1, round_timeout_s=1.5, evaluate_every=0, server_evaluate=False
    ) as (server, future):
        stub = fl_pb2_grpc.FederatedLearningStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        for name in ("a", "b"):
            stub.Join(pb.JoinRequest(client_name=name), timeout=5)
        with ThreadPoolExecutor(2) as pool:
            first = list(pool.map(lambda n: _fetch_until(stub, n, pb.FIT)[0], ["a", "b"]))
        assert [h.round for h in first] == [1, 1]
        assert _submit(stub, "a", first[0].task_id, _update(64)).accepted
        time.sleep(1.8)  # past the deadline with one answer of the two needed
        code, details = _status(lambda: _submit(stub, "b", first[1].task_id, _update(64)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.startswith(f"task '{first[1].task_id}' is not open (its round closed")
        with ThreadPoolExecutor(2) as pool:
            second = list(pool.map(lambda n: _fetch_until(stub, n, pb.FIT)[0], ["a", "b"]))
        assert {h.task_id for h in second}.isdisjoint(h.task_id for h in first)
        for name, header in zip(["a", "b"], second, strict=True):
            assert _submit(stub, name, header.task_id, _update(64)).accepted
        records = future.result(timeout=30)
    assert [(r["round"], r["attempts"], r["clients"]) for r in records] == [(1, 2, ["a", "b"])]


def test_client_with_a_wrong_token_stops_with_the_servers_reason(tmp_path: Path) -> None:
    tokens = {"alice": "alice-secret-token"}
    with _inproc_server(tmp_path, tokens=tokens) as (server, _):
        client = FederatedClient(f"127.0.0.1:{server.port}", "digits:0/2", token="guess-1234")
        with pytest.raises(UserError) as err:
            client.run()
    assert str(err.value) == (
        f"server 127.0.0.1:{server.port} refused the client: UNAUTHENTICATED: invalid token; "
        "use the token the server operator issued to this client"
    )


def _job(tmp_path: Path, budgets: Sequence[int | None], **settings: Any) -> tuple[dict, list]:
    with _inproc_server(tmp_path, rounds=1, evaluate_every=1, **settings) as (server, future):
        clients = [
            FederatedClient(
                f"127.0.0.1:{server.port}", f"digits:{i}/2", name=f"c{i}", max_steps=budget
            )
            for i, budget in enumerate(budgets)
        ]
        threads = [threading.Thread(target=c.run) for c in clients]
        for t in threads:
            t.start()
        records = future.result(timeout=60)
        for t in threads:
            t.join(30)
    return records[0], [c.summary for c in clients]


def test_compression_budget_and_byte_accounting(tmp_path: Path) -> None:
    plain, plain_clients = _job(tmp_path / "plain", [None, None])
    small, small_clients = _job(
        tmp_path / "int8",
        [None, 2],
        upload_codec="int8",
        download_codec="int8",
        max_local_steps=3,
    )
    topk, _ = _job(tmp_path / "topk", [None, None], upload_codec="topk", topk_fraction=0.05)
    for record, summaries in ((plain, plain_clients), (small, small_clients)):
        # Bytes in the round log are exactly the payloads the clients sent and received.
        assert record["bytes_up"] == sum(s.bytes_sent for s in summaries)
        assert record["bytes_down"] == sum(s.bytes_received for s in summaries)
    assert small["bytes_up"] < 0.3 * plain["bytes_up"]
    assert small["bytes_down"] < 0.3 * plain["bytes_down"]
    assert topk["bytes_up"] < 0.15 * plain["bytes_up"]
    assert plain["local_steps"] == 46  # 2 epochs of 719 samples in batches of 32
    # Server budget 3 steps, one client's own budget 2; equal shards weigh them equally.
    assert small["num_examples"] == 1438 and small["local_steps"] == pytest.approx(2.5)


# -- process tests -------------------------------------------------------------------


def test_fedavg_two_client_processes_reach_90_percent(tmp_path: Path, procs: Procs) -> None:
    port, state = free_port(), tmp_path / "state"
    procs.start("server", _server_main, _settings(port), str(state), procs.log("server"))
    for i in range(2):
        out = str(tmp_path / f"c{i}.json")
        procs.start(
            f"c{i}",
            _client_main,
            port,
            f"digits:{i}/2",
            f"c{i}",
            out,
            procs.log(f"c{i}"),
            None,
            None,
        )
    assert procs.wait("server", 90) == 0, procs.logs()
    for i in range(2):
        assert procs.wait(f"c{i}", 20) == 0, procs.logs()
    records = _records(state)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test_accuracy"] >= 0.9, records
    assert "round 4: attempts=1 sampled=2" in Path(procs.log("server")).read_text()
    # Client-side evaluation covers the test split in two shards: same weighted accuracy.
    assert records[-1]["eval_accuracy"] == pytest.approx(records[-1]["test_accuracy"])
    summaries = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(2)]
    assert all(s["fit_rounds"] == [1, 2, 3, 4] for s in summaries)
    assert sum(r["bytes_up"] for r in records) == sum(s["bytes_sent"] for s in summaries)
    with sqlite3.connect(state / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 5  # rounds 0..4
        assert sorted(n for (n,) in db.execute("SELECT name FROM clients")) == ["c0", "c1"]


def test_server_killed_mid_training_resumes_after_last_completed_round(
    tmp_path: Path, procs: Procs
) -> None:
    port, state = free_port(), tmp_path / "state"
    settings = _settings(port, rounds=8, download_codec="fp16", upload_codec="int8")
    procs.start("server", _server_main, settings, str(state), procs.log("server"))
    for i in range(2):
        procs.start(
            f"c{i}",
            _client_main,
            port,
            f"digits:{i}/2",
            f"c{i}",
            str(tmp_path / f"c{i}.json"),
            procs.log(f"c{i}"),
            None,
            None,
        )
    _wait_for(lambda: len(_records(state)) >= 1, 60, "a completed round", procs)
    procs.kill("server")
    killed_at = time.time()
    with sqlite3.connect(state / "state.sqlite") as db:
        last = db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]
        before = db.execute("SELECT round, sha256, metrics FROM rounds ORDER BY round").fetchall()
    assert 1 <= last < 8
    procs.start("server2", _server_main, settings, str(state), procs.log("server2"))
    assert procs.wait("server2", 90) == 0, procs.logs()
    for i in range(2):
        assert procs.wait(f"c{i}", 20) == 0, procs.logs()
    assert f"resuming after round {last} from" in Path(procs.log("server2")).read_text()
    with sqlite3.connect(state / "state.sqlite") as db:
        after = db.execute(
            "SELECT round, sha256, metrics, completed_at FROM rounds ORDER BY round"
        ).fetchall()
    assert [r[0] for r in after] == list(range(9))
    # Completed rounds were kept as they were, not redone; the rest ran after the restart.
    assert [r[:3] for r in after[: last + 1]] == before
    assert all(r[3] > killed_at for r in after[last + 1 :])
    records = _records(state)
    assert [r["round"] for r in records] == list(range(1, 9))
    assert records[-1]["test_accuracy"] >= 0.9, records
    summaries = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(2)]
    assert all(set(range(last + 1, 9)) <= set(s["fit_rounds"]) for s in summaries)


def test_client_killed_mid_round_does_not_stop_training(tmp_path: Path, procs: Procs) -> None:
    port, state = free_port(), tmp_path / "state"
    marker = tmp_path / "doomed.json"
    settings = _settings(port, rounds=3, round_timeout_s=3.0, evaluate_every=0)
    procs.start("server", _server_main, settings, str(state), procs.log("server"))
    procs.start("doomed", _doomed_main, port, str(marker), procs.log("doomed"))
    # Joined first, the doomed client is available when round 1 samples, so it gets a task.
    _wait_for(Path(f"{marker}.joined").exists, 60, "the doomed client to join", procs)
    for i in range(2):
        procs.start(
            f"c{i}",
            _client_main,
            port,
            f"digits:{i}/2",
            f"c{i}",
            str(tmp_path / f"c{i}.json"),
            procs.log(f"c{i}"),
            None,
            None,
        )
    _wait_for(marker.exists, 60, "the doomed client to take a task", procs)
    procs.kill("doomed")
    assert procs.wait("server", 90) == 0, procs.logs()
    records = _records(state)
    assert [r["round"] for r in records] == [1, 2, 3]
    doomed_round = json.loads(marker.read_text())["round"]
    doomed_attempt = int(json.loads(marker.read_text())["task_id"].split("/")[2])
    hit = records[doomed_round - 1]
    assert hit["clients"] == ["c0", "c1"]
    # Either the round completed with the two survivors, or it was retried without the dead one.
    assert hit["sampled"] == 3 or hit["attempts"] > doomed_attempt, hit
    assert all(r["sampled"] == 2 for r in records[doomed_round:])  # the dead one is skipped


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls_tokens_and_bad_requests_are_rejected_while_others_are_served(
    tmp_path: Path, procs: Procs
) -> None:
    port, state = free_port(), tmp_path / "state"
    cert, key = _self_signed(tmp_path)
    tokens = {"alice": "alice-secret-token", "mallory": "mallory-secret-token"}
    settings = _settings(
        port,
        rounds=1,
        tls_cert=cert,
        tls_key=key,
        tokens=tokens,
        chunk_size_kb=256,
        max_message_mb=1.0,
        evaluate_every=0,
    )
    procs.start("server", _server_main, settings, str(state), procs.log("server"))
    procs.start(
        "alice",
        _client_main,
        port,
        "digits:0/2",
        "ignored",
        str(tmp_path / "a.json"),
        procs.log("alice"),
        tokens["alice"],
        cert,
    )
    creds = grpc.ssl_channel_credentials(Path(cert).read_bytes())
    channel = grpc.secure_channel(f"localhost:{port}", creds)
    stub = fl_pb2_grpc.FederatedLearningStub(channel)
    md = [("authorization", f"Bearer {tokens['mallory']}")]

    code, details = _status(lambda: _retry(lambda: stub.Join(pb.JoinRequest(), timeout=5)))
    assert (code, details) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing 'authorization: Bearer <token>' metadata; start the client with --token",
    )
    wrong = [("authorization", "Bearer not-a-token")]
    code, details = _status(lambda: stub.Join(pb.JoinRequest(), metadata=wrong, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("invalid token;")
    with grpc.insecure_channel(f"localhost:{port}") as plain_channel:
        plain = fl_pb2_grpc.FederatedLearningStub(plain_channel)
        code, _ = _status(lambda: plain.Join(pb.JoinRequest(), metadata=md, timeout=3))
    assert code == grpc.StatusCode.UNAVAILABLE  # no TLS, no service
    garbage = channel.unary_unary("/distml.federated.FederatedLearning/Join")
    code, _ = _status(lambda: garbage(b"\xff\xff\xff\xff", metadata=md, timeout=5))
    assert code == grpc.StatusCode.INTERNAL  # the protobuf request does not parse

    joined = stub.Join(pb.JoinRequest(client_name="eve"), metadata=md, timeout=5)
    assert joined.client_name == "mallory"  # the token, not the request, names the client
    header, _ = _fetch_until(stub, "", pb.FIT, md)
    task, good = header.task_id, _update(64)

    def submit(payload: bytes, **kw: Any) -> tuple[grpc.StatusCode, str]:
        return _status(lambda: _submit(stub, "", task, payload, md, **kw))

    assert submit(good, chunks=[good + os.urandom(2**20)], size=len(good) + 2**20)[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED  # one message above max_message_mb
    )
    code, details = submit(good, size=50 * 2**20)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("update of 52428800 bytes exceeds the limit of")
    junk = os.urandom(5000)
    assert submit(junk) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload is not valid safetensors data; encode it with encode_parameters()",
    )
    assert submit(good, sha="0" * 64) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "update checksum mismatch (SHA-256); resend it",
    )
    assert submit(_update(32)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "parameter 'layers.0.weight' has shape (32, 64), the model expects (64, 64); "
        "train the model architecture the server sends",
    )
    assert submit(good, header_first=False) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first SubmitResult message must be a ResultHeader",
    )
    assert _submit(stub, "", task, good, md, chunk=100_000).accepted  # valid, in chunks
    assert procs.wait("server", 60) == 0, procs.logs()
    assert procs.wait("alice", 20) == 0, procs.logs()
    (record,) = _records(state)
    assert record["clients"] == ["alice", "mallory"] and record["attempts"] == 1
    alice = json.loads((tmp_path / "a.json").read_text())
    assert alice["name"] == "alice" and alice["fit_rounds"] == [1]
    log = Path(procs.log("server")).read_text()
    assert "rejected result from 'mallory': parameter 'layers.0.weight' has shape" in log
    channel.close()
