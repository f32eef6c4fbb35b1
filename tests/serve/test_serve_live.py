"""Against a real uvicorn server: streaming, timeouts, chunked bodies and graceful shutdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from distml.serve import build_app


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])
            event = "message"


def test_streaming_yields_tokens_while_the_model_still_generates(
    gpt_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    app = build_app(str(gpt_ckpt), replicas=0, max_new_tokens=400)
    server = live_server(app)
    service = app.state.service
    request = {"prompt": "the ", "max_new_tokens": 300, "seed": 7, "temperature": 0.9}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        whole = client.post("/v1/generate", json=request).json()
        tokens: list[int] = []
        texts: list[str] = []
        busy_at_first_token = None
        with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for event, data in _events(r.iter_lines()):
                assert event == "message", data
                if "token" in data:
                    if busy_at_first_token is None:
                        busy_at_first_token = service.pool.load()
                    tokens.append(data["token"])
                    texts.append(data["text"])
                else:
                    assert data["done"] and data["tokens"] == 300
        # The first token reached us while the job was still running on the replica.
        assert busy_at_first_token == 1
        assert tokens == whole["tokens"] and "".join(texts) == whole["text"]


def test_timeouts_answer_504_and_the_server_recovers(
    gpt_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    app = build_app(str(gpt_ckpt), replicas=0, max_new_tokens=1500, request_timeout_s=0.3)
    server = live_server(app)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        start = time.monotonic()
        r = client.post("/v1/generate", json={"prompt": "the", "max_new_tokens": 1500})
        assert r.status_code == 504 and time.monotonic() - start < 10
        assert r.json()["error"] == "request timed out after 0.3s; retry later"
        # The abandoned job still occupies the replica until it ends; then all is normal.
        _wait_for(lambda: app.state.service.pool.load() == 0, 60, "the abandoned job")
        r = client.post("/v1/generate", json={"prompt": "the", "max_new_tokens": 3})
        assert r.status_code == 200 and len(r.json()["tokens"]) == 3


def test_a_chunked_body_over_the_limit_is_refused(
    cnn_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    server = live_server(build_app(str(cnn_ckpt), replicas=0, max_body_bytes=10_000))

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [' + b"0," * 3000
        yield b"0," * 3000 + b"0]}"

    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(
            "/v1/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"] == "body exceeds the 10000-byte limit; send fewer inputs"
        r = client.post("/v1/predict", json={"inputs": [[0.5] * 64]})
        assert r.status_code == 200


def test_graceful_shutdown_finishes_requests_in_flight(
    gpt_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    app = build_app(str(gpt_ckpt), replicas=0, max_new_tokens=400)
    server = live_server(app)
    service = app.state.service

    def generate(seed: int) -> tuple[int, int]:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post(
                "/v1/generate", json={"prompt": "the", "max_new_tokens": 150, "seed": seed}
            )
            return r.status_code, len(r.json().get("tokens", []))

    with ThreadPoolExecutor(3) as executor:
        futures = [executor.submit(generate, seed) for seed in range(3)]
        # All three reached the server (queued or running) before the shutdown begins.
        _wait_for(lambda: service.active_requests == 3, 30, "requests in flight")
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        results = [f.result(timeout=60) for f in futures]
        stopper.join(60)
    assert results == [(200, 150)] * 3
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
