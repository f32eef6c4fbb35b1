"""Batched generation: rows decoded together equal each prompt generated alone."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from distml.models.gpt import GPT, GPTConfig
from distml.serve import build_app
from distml.serve.generation import SamplingParams, generate_batch


def _alone(model: GPT, prompt: torch.Tensor, p: SamplingParams) -> list[int]:
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    out = model.generate(prompt[None], p.max_new_tokens, p.temperature, p.top_k, gen)
    return out[0, len(prompt) :].tolist()


def test_generate_batch_rows_equal_model_generate_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    lengths = [3, 9, 1, 14]
    prompts = [torch.randint(0, 40, (n,)) for n in lengths]
    # Mixed lengths, step counts and sampling; row 3 slides past block_size while row 2 is short.
    params = [
        SamplingParams(6, 0.0),
        SamplingParams(4, 0.9, top_k=5, seed=11),
        SamplingParams(9, 1.3, seed=2),
        SamplingParams(8, 0.0),
    ]
    streamed: list[tuple[int, int]] = []
    got = generate_batch(model, prompts, params, 16, on_token=lambda r, t: streamed.append((r, t)))
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert got[i] == _alone(model, prompt, p), f"row {i}"
        assert [t for r, t in streamed if r == i] == got[i]
    # The batch shrinks as rows finish: 9 steps for the longest row, 27 tokens in all.
    assert len(streamed) == sum(p.max_new_tokens for p in params)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_concurrent_generate_requests_share_batches_and_get_their_own_tokens(
    gpt_ckpt: Path,
) -> None:
    bodies: list[dict[str, Any]] = [
        {"prompt": "the ", "max_new_tokens": 12, "temperature": 0.0},
        {"prompt": "the lazy dog", "max_new_tokens": 5, "temperature": 0.0},
        {"prompt": "quick", "max_new_tokens": 9, "temperature": 0.8, "seed": 4, "top_k": 6},
        {"prompt": "fox jumps over", "max_new_tokens": 7, "temperature": 1.0, "seed": 9},
        {"prompt": "o", "max_new_tokens": 10, "temperature": 0.0},
        {"prompt": "brown ", "max_new_tokens": 3, "temperature": 0.5, "seed": 1},
    ]
    app = build_app(str(gpt_ckpt), replicas=0, max_delay_ms=300, max_new_tokens=64)
    with TestClient(app) as client:
        alone = []
        for body in bodies:  # one at a time: each request is its own batch
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            alone.append(r.json())
        metrics = client.get("/metrics").text
        assert _metric(metrics, "distml_serve_generate_batch_size_count") == len(bodies)
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
        metrics = client.get("/metrics").text
    assert [r.status_code for r in together] == [200] * len(bodies)
    for body, single, r in zip(bodies, alone, together, strict=True):
        assert len(single["tokens"]) == body["max_new_tokens"]
        assert r.json() == single
    batches = _metric(metrics, "distml_serve_generate_batch_size_count") - len(bodies)
    rows = _metric(metrics, "distml_serve_generate_batch_size_sum") - len(bodies)
    assert rows == len(bodies) and batches < len(bodies), "no generation batch held > 1 request"


@pytest.mark.parametrize("stream_first", [True, False])
def test_a_streamed_and_a_plain_request_in_one_batch_both_get_their_tokens(
    gpt_ckpt: Path, stream_first: bool
) -> None:
    import json

    # wait_when_idle: the first request waits 300 ms for the second, so the two share a batch.
    app = build_app(
        str(gpt_ckpt), replicas=0, max_delay_ms=300, max_new_tokens=64, wait_when_idle=True
    )
    plain = {"prompt": "the lazy ", "max_new_tokens": 8, "temperature": 0.0}
    streamed = {"prompt": "dog", "max_new_tokens": 6, "seed": 5, "stream": True}
    with TestClient(app) as client:
        ref_plain = client.post("/v1/generate", json=plain).json()["tokens"]
        ref_stream = client.post("/v1/generate", json={**streamed, "stream": False}).json()

        def stream() -> list[int]:
            with client.stream("POST", "/v1/generate", json=streamed) as r:
                data = [json.loads(line[6:]) for line in r.iter_lines() if line[:6] == "data: "]
            assert data[-1]["done"] and data[-1]["tokens"] == 6
            return [d["token"] for d in data[:-1]]

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(stream) if stream_first else None
            other = pool.submit(lambda: client.post("/v1/generate", json=plain).json())
            first = first or pool.submit(stream)
            assert first.result(60) == ref_stream["tokens"]
            assert other.result(60)["tokens"] == ref_plain
        metrics = client.get("/metrics").text
    assert _metric(metrics, "distml_serve_generate_batch_size_count") == 3
