"""The HTTP app with an in-process replica: correctness, batching, validation, auth, generation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from distml.data.text import CharTokenizer
from distml.inference.predict import load_for_inference
from distml.inference.quantize import quantize_checkpoint
from distml.serve import TENSOR_CONTENT_TYPE, build_app, decode_tensor, encode_tensor
from distml.train.checkpoint import load_checkpoint


def _direct(path: Path | str, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """What `distml predict` computes: the loaded model's float logits, in eval mode."""
    _, model = load_for_inference(str(path), torch.device("cpu"))
    with torch.no_grad():
        return model(x, **kwargs).float()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def digits_x() -> torch.Tensor:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return torch.tensor(x[:24] / 16.0, dtype=torch.float32).reshape(24, 1, 8, 8)


@pytest.fixture
def cnn_client(cnn_ckpt: Path) -> Iterator[TestClient]:
    app = build_app(str(cnn_ckpt), replicas=0, max_delay_ms=30, max_body_bytes=64_000)
    with TestClient(app) as client:
        yield client


def test_served_predictions_equal_the_models_direct_output(
    cnn_client: TestClient, cnn_ckpt: Path, digits_x: torch.Tensor
) -> None:
    expected = _direct(cnn_ckpt, digits_x)
    r = cnn_client.post("/v1/predict", json={"inputs": digits_x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"] == expected.argmax(-1).tolist()
    np.testing.assert_allclose(body["logits"], expected.numpy(), rtol=1e-5, atol=1e-5)
    # Flat rows (as `distml predict` reads from CSV) and probabilities.
    flat = digits_x[:3].reshape(3, 64).tolist()
    r = cnn_client.post("/v1/predict", json={"inputs": flat, "output": "probabilities"})
    probs = torch.softmax(expected[:3], -1).numpy()
    np.testing.assert_allclose(r.json()["probabilities"], probs, rtol=1e-5, atol=1e-6)


def test_binary_tensor_round_trip(
    cnn_client: TestClient, cnn_ckpt: Path, digits_x: torch.Tensor
) -> None:
    body = encode_tensor(digits_x[:5].numpy())
    headers = {"content-type": TENSOR_CONTENT_TYPE, "accept": TENSOR_CONTENT_TYPE}
    r = cnn_client.post("/v1/predict", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == TENSOR_CONTENT_TYPE
    logits = decode_tensor(r.content)
    assert logits.dtype == np.float32 and logits.shape == (5, 10)
    np.testing.assert_allclose(
        logits, _direct(cnn_ckpt, digits_x[:5]).numpy(), rtol=1e-5, atol=1e-5
    )
    # A tensor request may still ask for JSON.
    r = cnn_client.post("/v1/predict", content=body, headers={"content-type": TENSOR_CONTENT_TYPE})
    np.testing.assert_allclose(r.json()["logits"], logits, rtol=1e-6, atol=1e-6)


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_result(
    cnn_client: TestClient, cnn_ckpt: Path, digits_x: torch.Tensor
) -> None:
    expected = _direct(cnn_ckpt, digits_x).numpy()

    def one(i: int) -> tuple[int, Any]:
        r = cnn_client.post("/v1/predict", json={"inputs": [digits_x[i].tolist()]})
        return r.status_code, r.json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(len(digits_x))))
    for i, (status, body) in enumerate(results):
        assert status == 200
        np.testing.assert_allclose(body["logits"][0], expected[i], rtol=1e-5, atol=1e-5)
    metrics = cnn_client.get("/metrics").text
    rows = _metric(metrics, "distml_serve_batch_size_sum")
    batches = _metric(metrics, "distml_serve_batch_size_count")
    assert rows == len(digits_x)
    assert batches < rows  # some batch merged several requests
    assert _metric(metrics, 'distml_serve_batch_size_bucket{le="1.0"}') < batches
    assert 'distml_serve_requests_total{endpoint="/v1/predict",status="200"} 24.0' in metrics


BAD_REQUESTS = [
    (
        {"content": b'{"inputs": [1, 2', "headers": {"content-type": "application/json"}},
        400,
        "malformed JSON body: Expecting",
    ),
    ({"json": [1, 2]}, 422, "the JSON body must be an object, got list"),
    ({"json": {"input": [[0.0] * 64]}}, 422, "unknown field(s) ['input']"),
    ({"json": {"inputs": []}}, 422, "'inputs' must be a non-empty list of inputs"),
    (
        {"json": {"inputs": [[0.0] * 63]}},
        422,
        "each input has shape [63] but the model expects [1, 8, 8] (or 64 flat values)",
    ),
    (
        {"json": {"inputs": [[0.0] * 64, [0.0] * 60]}},
        422,
        "'inputs' is ragged: every input must have shape [1, 8, 8]",
    ),
    ({"json": {"inputs": [["a"] * 64]}}, 422, "'inputs' must hold only numbers"),
    (
        {"json": {"inputs": [[0.0] * 64], "output": "argmax"}},
        422,
        "'output' must be one of ['logits', 'probabilities'], got 'argmax'",
    ),
    (
        {"content": b"a,b", "headers": {"content-type": "text/csv"}},
        415,
        "unsupported Content-Type 'text/csv'",
    ),
    (
        {"content": b"DMLT\x00\x00", "headers": {"content-type": TENSOR_CONTENT_TYPE}},
        400,
        "bad tensor body: tensor body is 6 bytes, shorter than its 8-byte prefix",
    ),
    ({"json": {"inputs": [[0.0] * 64] * 400}}, 413, "exceeds the 64000-byte limit"),
]


@pytest.mark.parametrize(("request_kwargs", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(
    cnn_client: TestClient,
    request_kwargs: dict[str, Any],
    status: int,
    message: str,
    digits_x: torch.Tensor,
) -> None:
    r = cnn_client.post("/v1/predict", **request_kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error and "\n" not in error
    good = cnn_client.post("/v1/predict", json={"inputs": [digits_x[0].tolist()]})
    assert good.status_code == 200


def test_nan_inputs_and_a_generate_call_on_a_classifier_are_refused(cnn_client: TestClient) -> None:
    r = cnn_client.post(
        "/v1/predict",
        content=b'{"inputs": [[' + b",".join([b"NaN"] * 64) + b"]]}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "NaN or infinity" in r.json()["error"]
    r = cnn_client.post("/v1/generate", json={"prompt": "hi"})
    assert r.status_code == 400
    assert r.json()["error"] == "/v1/generate needs a causal_lm model; this one is classification"


def test_bearer_token_guards_the_api_but_not_health(cnn_ckpt: Path, digits_x: torch.Tensor) -> None:
    body = {"inputs": [digits_x[0].tolist()]}
    with TestClient(build_app(str(cnn_ckpt), replicas=0, token="s3cret")) as client:
        r = client.post("/v1/predict", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "missing bearer token; send 'Authorization: Bearer <token>'"
        r = client.post("/v1/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"] == "invalid bearer token"
        r = client.post("/v1/predict", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert client.get("/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def gpt_client(gpt_ckpt: Path) -> Iterator[TestClient]:
    with TestClient(build_app(str(gpt_ckpt), replicas=0, max_new_tokens=64)) as client:
        yield client


def _reference_generation(path: Path, prompt: str, n: int, **kw: Any) -> tuple[list[int], str]:
    state = load_checkpoint(path)
    tok = CharTokenizer(state["tokenizer"]["chars"])
    _, model = load_for_inference(str(path), torch.device("cpu"))
    seed = kw.pop("seed")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        out = model.generate(tok.encode(prompt)[None], n, generator=gen, **kw)
    new = out[0, len(prompt) :].tolist()
    return new, tok.decode(new)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8, "top_k": 5, "seed": 3},
        {"temperature": 0.0, "top_k": None, "seed": None},
    ],
)
def test_generate_returns_the_requested_tokens_equal_to_model_generate(
    gpt_client: TestClient, gpt_ckpt: Path, params: dict[str, Any]
) -> None:
    r = gpt_client.post(
        "/v1/generate", json={"prompt": "the lazy ", "max_new_tokens": 20, **params}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    tokens, text = _reference_generation(gpt_ckpt, "the lazy ", 20, **params)
    assert len(body["tokens"]) == 20
    assert body["tokens"] == tokens and body["text"] == text and body["prompt"] == "the lazy "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        (
            {"prompt": "the", "max_new_tokens": 0},
            "'max_new_tokens' must be an integer in [1, 64], got 0",
        ),
        (
            {"prompt": "the", "max_new_tokens": 65},
            "'max_new_tokens' must be an integer in [1, 64], got 65",
        ),
        (
            {"prompt": "the", "temperature": -1},
            "'temperature' must be a number >= 0 (0 = greedy), got -1",
        ),
        ({"prompt": "the", "top_k": 0}, "'top_k' must be an integer >= 1 or null, got 0"),
        ({"prompt": "the", "stream": "yes"}, "'stream' must be true or false, got 'yes'"),
        ({"prompt": "the", "beams": 4}, "unknown field(s) ['beams']"),
        ({"prompt": "QZ"}, "prompt: character 'Q' is not in the training vocabulary"),
    ],
)
def test_bad_generate_parameters_are_named(
    gpt_client: TestClient, body: dict[str, Any], message: str
) -> None:
    r = gpt_client.post("/v1/generate", json=body)
    assert r.status_code == 422 and message in r.json()["error"]
    assert (
        gpt_client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 2}).status_code
        == 200
    )


def test_text_inputs_of_different_lengths_match_unpadded_runs(
    gpt_client: TestClient, gpt_ckpt: Path
) -> None:
    texts = ["the quick", "lazy dog. the quick brown", "o"]
    r = gpt_client.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200
    tok = CharTokenizer(load_checkpoint(gpt_ckpt)["tokenizer"]["chars"])
    for text, logits, preds in zip(texts, r.json()["logits"], r.json()["predictions"], strict=True):
        expected = _direct(gpt_ckpt, tok.encode(text)[None])[0]
        np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)
        assert preds == expected.argmax(-1).tolist()
    r = gpt_client.post("/v1/predict", json={"inputs": [[1, 2, 999]]})
    assert r.status_code == 422
    assert r.json()["error"].startswith("inputs[0] has token id 999 outside the vocabulary [0, ")
    r = gpt_client.post("/v1/predict", json={"inputs": [[1] * 33]})
    assert r.json()["error"] == (
        "inputs[0] has 33 tokens but the model's block_size is 32; send shorter sequences"
    )


def test_masked_lm_padding_is_masked_out(bert_ckpt: Path) -> None:
    seqs = [[3, 4, 5, 6, 7, 8], [9, 10], [1, 2, 3, 4]]
    with TestClient(build_app(str(bert_ckpt), replicas=0, max_delay_ms=20)) as client:
        r = client.post("/v1/predict", json={"inputs": seqs})
    assert r.status_code == 200
    for seq, logits in zip(seqs, r.json()["logits"], strict=True):
        expected = _direct(bert_ckpt, torch.tensor([seq]))[0]
        np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_a_quantized_model_serves_what_it_computes(
    cnn_ckpt: Path, tmp_path: Path, digits_x: torch.Tensor
) -> None:
    out = str(tmp_path / "cnn-int8.safetensors")
    quantize_checkpoint(str(cnn_ckpt), 8, out)
    with TestClient(build_app(out, replicas=0)) as client:
        r = client.post("/v1/predict", json={"inputs": digits_x[:6].tolist()})
    assert r.status_code == 200
    expected = _direct(out, digits_x[:6])
    np.testing.assert_allclose(r.json()["logits"], expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("target_ms", "grows"), [(10_000.0, True), (1e-6, False)])
def test_adaptive_batching_moves_the_cap_with_latency(
    cnn_ckpt: Path, digits_x: torch.Tensor, target_ms: float, grows: bool
) -> None:
    app = build_app(
        str(cnn_ckpt),
        replicas=0,
        adaptive_batching=True,
        target_p99_ms=target_ms,
        max_batch_size=16,
        max_delay_ms=0,
    )
    with TestClient(app) as client:
        for _ in range(8 * 3):  # three AIMD windows of sequential single-row batches
            assert (
                client.post("/v1/predict", json={"inputs": [digits_x[0].tolist()]}).status_code
                == 200
            )
        cap = _metric(client.get("/metrics").text, "distml_serve_batch_size_cap")
    assert cap == (4.0 if grows else 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_replica_that_cannot_load_the_model_stops_startup_with_one_line(cnn_ckpt: Path) -> None:
    from distml.errors import UserError

    app = build_app(str(cnn_ckpt), replicas=0, device="cuda", startup_timeout_s=30)
    with pytest.raises(UserError) as info, TestClient(app):
        pass
    message = str(info.value)
    assert message == (
        "a replica could not load the model (Torch not compiled with CUDA enabled); "
        "check the model file and device"
    )


def test_a_missing_model_file_fails_before_serving(tmp_path: Path) -> None:
    from distml.errors import UserError

    with pytest.raises(UserError, match="checkpoint not found"):
        build_app(str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=r"unknown serve option\(s\) \['replica'\]"):
        build_app(str(tmp_path / "nope.pt"), replica=2)


def test_model_routes_skip_the_router_but_keep_methods_errors_and_metrics(
    cnn_client: TestClient, digits_x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # POST /v1/predict runs through the hot path; other methods still meet FastAPI's router.
    assert cnn_client.get("/v1/predict").status_code == 405
    assert cnn_client.post("/v1/nope", json={}).status_code == 404
    service = cnn_client.app.state.service  # type: ignore[attr-defined]

    async def broken(rows: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "predict", broken)
    body = {"inputs": [digits_x[0].tolist()]}
    r = cnn_client.post("/v1/predict", json=body)
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error; see the server log"}
    monkeypatch.undo()
    assert cnn_client.post("/v1/predict", json=body).status_code == 200
    metrics = cnn_client.get("/metrics").text
    assert 'distml_serve_requests_total{endpoint="/v1/predict",status="500"} 1.0' in metrics
    assert 'distml_serve_requests_total{endpoint="/v1/predict",status="405"} 1.0' in metrics
    assert 'distml_serve_requests_total{endpoint="other",status="404"} 1.0' in metrics
