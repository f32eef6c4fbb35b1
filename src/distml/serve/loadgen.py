"""A closed-loop HTTP load generator for a local model server (the serving benchmark's client).

``concurrency`` async workers each keep one HTTP/1.1 keep-alive connection
(asyncio streams); each sends a request, waits for its answer and sends the
next, until ``max_requests`` have been sent or ``max_duration_s`` has passed.
It only talks to loopback addresses, so a benchmark can never load someone
else's service. :class:`LoadResult` holds the throughput of successful
requests, latency percentiles and the status counts; failures are counted,
never retried. Why not httpx: on this 2-core machine an httpx AsyncClient
became the bottleneck as concurrency grew (a trivial FastAPI endpoint fell
from ~1,100 to ~130 req/s between 4 and 64 connections, p99 2.2 s), while
plain asyncio streams held ~4,000 req/s at every level; a load generator must
not measure itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    start = time.perf_counter()
    deadline = start + max_duration_s

    async def worker() -> None:
        nonlocal sent
        conn: _Connection | None = None
        try:
            while sent < max_requests and time.perf_counter() < deadline:
                index = sent
                sent += 1
                path, body = make_request(index)
                payload = json.dumps(body).encode()
                request = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                    f"{extra}\r\n"
                ).encode() + payload
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(_Connection.open(host, port), timeout_s)
                    code, keep = await asyncio.wait_for(conn.exchange(request), timeout_s)
                    status = str(code)
                    if not keep:
                        conn.close()
                        conn = None
                except (
                    OSError,
                    asyncio.TimeoutError,
                    asyncio.IncompleteReadError,
                    ValueError,
                ) as exc:
                    status = type(exc).__name__
                    if conn is not None:
                        conn.close()
                        conn = None
                statuses[status] += 1
                if status == "200":
                    latencies.append(time.perf_counter() - t0)
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summarise(concurrency, latencies, statuses, time.perf_counter() - start)


class _Connection:
    """One HTTP/1.1 keep-alive connection: send a request, read one whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """(status code, connection reusable) after reading the response body to its end."""
        self.writer.write(request)
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        code = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.strip().lower()
        if fields.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)  # chunk data and its CRLF
                if size == 0:
                    break
        else:
            await self.reader.readexactly(int(fields.get("content-length", "0")))
        return code, fields.get("connection") != "close"

    def close(self) -> None:
        self.writer.close()


def run_load_sync(
    url: str,
    make_request: MakeRequest,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    **kwargs: Any,
) -> LoadResult:
    """:func:`run_load` from synchronous code (its own event loop, uvloop's when installed).

    uvloop cut the client's CPU per request from 61-62 to 47-55 us (64
    connections to a local server); on a 2-core machine the client shares the
    cores with the server it measures, so a cheaper client leaves the server
    more of them (alike for every configuration).
    """
    coro = run_load(url, make_request, concurrency, max_requests, max_duration_s, **kwargs)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
