"""Process replicas: routing, recovery from a SIGKILLed replica, and autoscaling up and down."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from distml.data.text import CharTokenizer
from distml.inference.predict import load_for_inference
from distml.serve import build_app
from distml.train.checkpoint import load_checkpoint


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _reference(path: Path, prompt: str, n: int, seed: int) -> list[int]:
    tok = CharTokenizer(load_checkpoint(path)["tokenizer"]["chars"])
    _, model = load_for_inference(str(path), torch.device("cpu"))
    with torch.no_grad():
        out = model.generate(
            tok.encode(prompt)[None], n, generator=torch.Generator().manual_seed(seed)
        )
    return out[0, len(prompt) :].tolist()


def test_a_killed_replica_is_replaced_and_no_request_hangs(
    gpt_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    # Generation requests are batched: a cap of 3 rows spreads the 6 over both replicas.
    app = build_app(
        str(gpt_ckpt), replicas=2, max_new_tokens=400, request_timeout_s=60, max_batch_size=3
    )
    server = live_server(app)
    pool = app.state.service.pool
    victim = pool.pids()[0]
    assert len(pool.pids()) == 2

    def generate(seed: int) -> tuple[int, dict[str, Any]]:
        with httpx.Client(base_url=server.url, timeout=90) as client:
            body = {"prompt": "the ", "max_new_tokens": 120, "seed": seed}
            r = client.post("/v1/generate", json=body)
            return r.status_code, r.json()

    start = time.monotonic()
    with ThreadPoolExecutor(6) as executor:
        futures = [executor.submit(generate, seed) for seed in range(6)]
        _wait_for(lambda: pool.busy_count() == 2, 60, "jobs on both replicas")
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=90) for f in futures]
    assert time.monotonic() - start < 90
    assert {status for status, _ in results} <= {200, 503}
    for seed, (status, body) in enumerate(results):
        if status == 200:  # a retried job is recomputed from its seed: same tokens
            assert body["tokens"] == _reference(gpt_ckpt, "the ", 120, seed)
        else:
            assert body["error"].startswith("replica ")
    assert sum(status == 200 for status, _ in results) >= 3

    _wait_for(lambda: pool.ready_count() == 2, 60, "the replacement replica")
    assert victim not in pool.pids()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["replicas_ready"] == 2
        metrics = client.get("/metrics").text
        assert _metric(metrics, "distml_serve_replica_restarts_total") == 1
        # Batched predictions through the replica processes equal the direct model.
        texts = ["the quick brown", "dog"]
        r = client.post("/v1/predict", json={"texts": texts})
        assert r.status_code == 200
    tok = CharTokenizer(load_checkpoint(gpt_ckpt)["tokenizer"]["chars"])
    _, model = load_for_inference(str(gpt_ckpt), torch.device("cpu"))
    for text, logits in zip(texts, r.json()["logits"], strict=True):
        with torch.no_grad():
            expected = model(tok.encode(text)[None])[0].numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_autoscaler_adds_a_replica_under_load_and_removes_it_when_idle(
    gpt_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    app = build_app(
        str(gpt_ckpt),
        replicas=1,
        min_replicas=1,
        max_replicas=2,
        scale_up_load=1.5,
        scale_down_load=0.5,
        upscale_delay_s=0.3,
        downscale_delay_s=1.0,
        max_new_tokens=200,
    )
    server = live_server(app)
    pool = app.state.service.pool
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=90) as client:
            while not stop.is_set():
                r = client.post("/v1/generate", json={"prompt": "the", "max_new_tokens": 60})
                statuses.append(r.status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        _wait_for(lambda: pool.ready_count() == 2, 90, "a second replica")
    finally:
        stop.set()
        for w in workers:
            w.join(90)
    assert statuses and set(statuses) == {200}
    _wait_for(lambda: pool.target_size() == 1 and pool.ready_count() == 1, 60, "scale-down")
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert _metric(metrics, 'distml_serve_scaling_events_total{direction="up"}') == 1
    assert _metric(metrics, 'distml_serve_scaling_events_total{direction="down"}') == 1
    assert _metric(metrics, "distml_serve_replicas") == 1
    r = httpx.post(
        f"{server.url}/v1/generate", json={"prompt": "the", "max_new_tokens": 2}, timeout=30
    )
    assert r.status_code == 200
