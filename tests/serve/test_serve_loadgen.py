"""The load generator: bounded, loopback-only, and its counts match what the server saw."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from distml.errors import UserError
from distml.serve import build_app
from distml.serve.loadgen import run_load_sync


def test_only_loopback_servers_are_targeted() -> None:
    with pytest.raises(UserError) as err:
        run_load_sync("http://10.1.2.3:8000", lambda i: ("/v1/predict", {}), 1, 1, 1.0)
    assert str(err.value) == (
        "the load generator only targets loopback servers, not '10.1.2.3'; "
        "use http://127.0.0.1:PORT"
    )


def test_a_bounded_run_sends_exactly_max_requests_and_counts_statuses(
    cnn_ckpt: Path, live_server: Callable[[Any], Any]
) -> None:
    server = live_server(build_app(str(cnn_ckpt), replicas=0, max_delay_ms=2))
    good = {"inputs": [[0.5] * 64]}

    def make(i: int) -> tuple[str, dict[str, Any]]:
        # Every fifth request is malformed: counted as 422, excluded from latency.
        return "/v1/predict", good if i % 5 else {"inputs": [[1.0]]}

    result = run_load_sync(server.url, make, concurrency=4, max_requests=40, max_duration_s=60)
    assert result.requests == 40 and result.ok == 32
    assert result.statuses == {"200": 32, "422": 8}
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.throughput_rps == pytest.approx(32 / result.duration_s)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    served = re.search(
        r'^distml_serve_requests_total\{endpoint="/v1/predict",status="200"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert served and float(served.group(1)) == 32
    # The duration bound stops a run long before its request bound.
    short = run_load_sync(server.url, make, 2, 10**6, max_duration_s=0.5)
    assert short.requests < 10**6 and short.duration_s < 10
