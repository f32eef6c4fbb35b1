"""Wire format, durable state and client data of the gRPC deployment, without a network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from distml.errors import CheckpointError, ConfigError, UserError
from distml.federated.config import FederatedSection
from distml.federated.deploy import load_client_data, write_client_shards
from distml.federated.parameters import get_parameters
from distml.federated.strategies import FitResult, build_strategy
from distml.federated.transport import load_tokens, train_local
from distml.federated.transport.store import (
    ServerStore,
    atomic_write,
    load_strategy_state,
    strategy_state,
)
from distml.federated.transport.wire import (
    Assembler,
    PayloadError,
    PayloadTooLarge,
    decode_parameters,
    encode_parameters,
    iter_chunks,
    make_encoder,
)
from distml.models import build_model

NAMES = ["w", "b"]
SHAPES = [(6, 5), (6,)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def test_codecs_round_trip_with_their_error_bounds() -> None:
    params = _params()
    exact = decode_parameters(
        encode_parameters(params, make_encoder("none")), "none", NAMES, SHAPES
    )
    assert all(torch.equal(a, b) for a, b in zip(exact, params, strict=True))
    half = decode_parameters(encode_parameters(params, make_encoder("fp16")), "fp16", NAMES, SHAPES)
    for a, b in zip(half, params, strict=True):
        assert torch.allclose(a, b, rtol=2**-11, atol=0)
    q = decode_parameters(encode_parameters(params, make_encoder("int8")), "int8", NAMES, SHAPES)
    for a, b in zip(q, params, strict=True):
        scale = b.abs().max() / 127
        assert (a - b).abs().max() <= scale / 2 + 1e-7  # round to nearest: half a step
    top = decode_parameters(
        encode_parameters(params, make_encoder("topk", topk_fraction=0.2)), "topk", NAMES, SHAPES
    )
    for a, b in zip(top, params, strict=True):
        k = int(np.ceil(0.2 * b.numel()))
        kept = torch.topk(b.abs().reshape(-1), k).indices
        assert torch.equal(a.reshape(-1)[kept], b.reshape(-1)[kept])
        assert int((a != 0).sum()) == k


def test_topk_error_feedback_sends_the_residual_next_time() -> None:
    encoder = make_encoder("topk", topk_fraction=0.1, error_feedback=True)
    params = _params()
    first = decode_parameters(encode_parameters(params, encoder), "topk", NAMES, SHAPES)
    zeros = [torch.zeros(s) for s in SHAPES]
    second = decode_parameters(encode_parameters(zeros, encoder), "topk", NAMES, SHAPES)
    # The second upload of nothing carries the largest entries the first one left out.
    for a, b, p in zip(first, second, params, strict=True):
        assert int((b != 0).sum()) > 0
        nz = b != 0
        assert torch.equal(b[nz], p[nz]) and bool((a[nz] == 0).all())


def test_decode_rejects_mismatched_shapes_with_the_parameter_named() -> None:
    wrong = [torch.zeros(6, 4), torch.zeros(6)]
    data = encode_parameters(wrong, make_encoder("none"))
    with pytest.raises(PayloadError) as err:
        decode_parameters(data, "none", NAMES, SHAPES)
    assert str(err.value) == (
        "parameter 'w' has shape (6, 4), the model expects (6, 5); "
        "train the model architecture the server sends"
    )
    with pytest.raises(PayloadError, match=r"^payload holds 1 tensors for 1 parameters, the model"):
        decode_parameters(encode_parameters(wrong[:1], make_encoder("none")), "none", NAMES, SHAPES)
    topk = encode_parameters([torch.ones(40), torch.ones(6)], make_encoder("topk", topk_fraction=1))
    with pytest.raises(PayloadError, match=r"^parameter 'w': 40 topk entries for a tensor of 30"):
        decode_parameters(topk, "topk", NAMES, SHAPES)


def test_decode_rejects_garbage_nan_and_wrong_dtype() -> None:
    with pytest.raises(PayloadError, match="not valid safetensors"):
        decode_parameters(b"\x00" * 64, "none", NAMES, SHAPES)
    bad = _params()
    bad[1][2] = float("nan")
    with pytest.raises(PayloadError, match="'b' contains NaN or inf"):
        decode_parameters(encode_parameters(bad, make_encoder("none")), "none", NAMES, SHAPES)
    half = encode_parameters(_params(), make_encoder("fp16"))
    with pytest.raises(PayloadError, match="'w' has dtype torch.float16, codec 'none' sends"):
        decode_parameters(half, "none", NAMES, SHAPES)
    with pytest.raises(PayloadError, match="unknown codec 'zip'"):
        decode_parameters(half, "zip", NAMES, SHAPES)


def test_chunks_reassemble_and_checks_fire() -> None:
    data = os.urandom(10_000)
    chunks = list(iter_chunks(data, 4096))
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    sha = hashlib.sha256(data).hexdigest()
    asm = Assembler(len(data), sha, limit=len(data))
    for c in chunks:
        asm.add(c)
    assert asm.finish() == data
    with pytest.raises(PayloadTooLarge, match="of 10000 bytes exceeds the limit of 9999 bytes"):
        Assembler(len(data), sha, limit=len(data) - 1)
    asm = Assembler(len(data), "0" * 64, limit=len(data))
    for c in chunks:
        asm.add(c)
    with pytest.raises(PayloadError, match="checksum mismatch"):
        asm.finish()
    asm = Assembler(100, sha, limit=len(data))
    with pytest.raises(PayloadError, match="more than the 100 bytes its header declared"):
        asm.add(chunks[0])
    asm = Assembler(len(data), sha, limit=len(data))
    asm.add(chunks[0])
    with pytest.raises(PayloadError, match="ended after 4096 of 10000 declared bytes"):
        asm.finish()


def test_store_round_trip_resume_and_integrity(tmp_path: Path) -> None:
    store = ServerStore(tmp_path)
    assert store.last_round() is None
    ids = {store.register_client("alice"), store.register_client("bob")}
    store.ensure_meta("model", "mlp-64", "hint")
    params = _params()
    strategy = build_strategy("fedavgm")
    update = FitResult(0, _params(1), 10, is_update=True)
    strategy.aggregate_fit(1, [update], params)
    store.save_round(0, params, {}, {"round": 0})
    store.save_round(1, params, strategy_state(strategy), {"round": 1, "test_accuracy": 0.5})
    store.close()

    again = ServerStore(tmp_path)  # a restarted server
    assert again.last_round() == 1
    assert set(again.clients().values()) == ids and again.register_client("alice") in ids
    loaded, state = again.load_round(1)
    assert all(torch.equal(a, b) for a, b in zip(loaded, params, strict=True))
    assert set(state) == {"velocity.0", "velocity.1"}
    assert again.round_records() == [{"round": 1, "test_accuracy": 0.5}]
    with pytest.raises(CheckpointError, match="was written with a different model"):
        again.ensure_meta("model", "cnn", "use a new federated.state_dir")
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    atomic_write(tmp_path / "note.txt", b"v1")
    atomic_write(tmp_path / "note.txt", b"v2")
    assert (tmp_path / "note.txt").read_bytes() == b"v2"
    ckpt = tmp_path / "checkpoints" / "round_000001.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-1] + b"!")
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        again.load_round(1)
    again.close()


def test_resumed_strategy_state_gives_the_same_aggregate(tmp_path: Path) -> None:
    current = _params()
    results = [
        [FitResult(c, _params(10 * r + c), 5 + c, is_update=True) for c in range(3)]
        for r in range(3)
    ]
    straight = build_strategy("fedadam")
    w = current
    for r in range(3):
        w = straight.aggregate_fit(r + 1, results[r], w)
    first = build_strategy("fedadam")
    w1 = first.aggregate_fit(1, results[0], current)
    store = ServerStore(tmp_path)
    store.save_round(1, w1, strategy_state(first), {"round": 1})
    params, state = store.load_round(1)
    resumed = build_strategy("fedadam")
    load_strategy_state(resumed, state)
    w2 = resumed.aggregate_fit(3, results[2], resumed.aggregate_fit(2, results[1], params))
    assert all(torch.equal(a, b) for a, b in zip(w2, w, strict=True))
    store.close()


def test_client_data_from_npz_and_shards(tmp_path: Path) -> None:
    paths = write_client_shards("digits", 2, tmp_path, seed=3)
    a, b = (load_client_data(str(p)) for p in paths)
    s0 = load_client_data("digits:0/2", seed=3)
    assert torch.equal(a.x, s0.x) and torch.equal(a.y, s0.y)
    assert a.x_test is not None and s0.x_test is not None and torch.equal(a.x_test, s0.x_test)
    assert len(a) + len(b) == 1438 and a.x.dtype == torch.float32 and a.y.dtype == torch.int64
    from distml.config import DataSection
    from distml.data import build_datasets

    train = build_datasets(DataSection(name="digits"), 3).train
    rows = sorted(map(bytes, torch.cat([a.x, b.x]).numpy()))
    assert rows == sorted(map(bytes, train.inputs.numpy()))  # the shards split the train set
    with pytest.raises(ConfigError, match="shard 2/2 is out of range; use 0..1"):
        load_client_data("digits:2/2")
    objects = tmp_path / "evil.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(UserError, match="cannot read client data .*allow_pickle"):
        load_client_data(str(objects))
    short = tmp_path / "short.npz"
    np.savez(short, x=np.zeros((3, 64), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="got 3 inputs and 2 labels"):
        load_client_data(str(short))
    with pytest.raises(UserError, match="neither an existing .npz file nor a shard spec"):
        load_client_data(str(tmp_path / "missing.npz"))


def test_settings_tokens_and_unknown_strategy(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="set both federated.tls_cert") as err:
        FederatedSection(tls_cert="c.pem", tokens={"a": "secret-token-a"})
    assert "secret-token-a" not in str(err.value)  # errors echo one field, never the tokens
    assert "secret-token-a" not in repr(FederatedSection(tokens={"a": "secret-token-a"}))
    with pytest.raises(pydantic.ValidationError, match="poll_timeout_s must be below client"):
        FederatedSection(poll_timeout_s=40)
    with pytest.raises(
        pydantic.ValidationError, match="chunk_size_kb must leave room under max_message_mb"
    ):
        FederatedSection(chunk_size_kb=2048, max_message_mb=1)
    with pytest.raises(ConfigError, match="tokens must be distinct"):
        load_tokens(FederatedSection(tokens={"a": "secret-1", "b": "secret-1"}))
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text("carol: secret-carol\n")
    assert load_tokens(
        FederatedSection(tokens={"a": "secret-a"}, tokens_file=str(tokens_file))
    ) == {
        "a": "secret-a",
        "carol": "secret-carol",
    }
    from distml.config import build_config
    from distml.federated.transport import FederatedServer

    cfg = build_config({"model": {"name": "mlp"}})
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match="unknown federated strategy 'fedsgdx'; choose one of"):
        FederatedServer(cfg, FederatedSection(strategy="fedsgdx"), state_dir=state)
    assert not state.exists()  # rejected before any state or socket was touched


def test_local_training_respects_the_step_budget_and_proximal_term() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(200, 64), torch.randint(0, 10, (200,))
    model = build_model("mlp", {"hidden": [16]})
    start = get_parameters(model)
    steps, loss = train_local(model, x, y, lr=0.1, epochs=5, batch_size=10, max_steps=7, seed=1)
    assert steps == 7 and loss > 0
    free = sum(float((a - b).norm()) for a, b in zip(get_parameters(model), start, strict=True))
    model2 = build_model("mlp", {"hidden": [16]})
    model2.load_state_dict(dict(zip(model.state_dict(), start, strict=True)))
    train_local(model2, x, y, lr=0.1, epochs=5, batch_size=10, max_steps=7, seed=1, proximal_mu=5)
    held = sum(float((a - b).norm()) for a, b in zip(get_parameters(model2), start, strict=True))
    assert held < 0.8 * free  # FedProx's pull towards the starting weights
