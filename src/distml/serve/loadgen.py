"""A closed-loop HTTP load generator for a local model server (the serving benchmark's client).

``concurrency`` async workers share one httpx client; each sends a request,
waits for its answer and sends the next, until ``max_requests`` have been
sent or ``max_duration_s`` has passed. It only talks to loopback addresses,
so a benchmark can never load someone else's service. :class:`LoadResult`
holds the throughput of successful requests, latency percentiles and the
status counts; failures are counted, never retried.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from distml.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: request index -> (path, JSON body) of the request to send.
MakeRequest = Callable[[int], tuple[str, dict[str, Any]]]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise UserError(
            f"the load generator only targets loopback servers, not {host!r}; "
            "use http://127.0.0.1:PORT"
        )


def _summarise(
    concurrency: int, latencies: list[float], statuses: Counter[str], duration: float
) -> LoadResult:
    ok = statuses.get("200", 0)
    ms = np.asarray(latencies, dtype=np.float64) * 1000.0
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return LoadResult(
        concurrency=concurrency,
        requests=sum(statuses.values()),
        ok=ok,
        duration_s=duration,
        throughput_rps=ok / duration if duration > 0 else 0.0,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=float(ms.mean()) if len(ms) else float("nan"),
        statuses=dict(statuses),
    )


async def run_load(
    url: str,
    make_request: MakeRequest,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop workers; latency counts successes only."""
    check_loopback(url)
    if concurrency < 1 or max_requests < 1 or max_duration_s <= 0:
        raise UserError("concurrency and max_requests must be >= 1 and max_duration_s > 0")
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    deadline = start + max_duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            index = sent
            sent += 1
            path, body = make_request(index)
            t0 = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            statuses[status] += 1
            if status == "200":
                latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(
        base_url=url, timeout=timeout_s, limits=limits, headers=headers
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return _summarise(concurrency, latencies, statuses, time.perf_counter() - start)


def run_load_sync(
    url: str,
    make_request: MakeRequest,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    **kwargs: Any,
) -> LoadResult:
    """:func:`run_load` from synchronous code (its own event loop)."""
    return asyncio.run(
        run_load(url, make_request, concurrency, max_requests, max_duration_s, **kwargs)
    )
