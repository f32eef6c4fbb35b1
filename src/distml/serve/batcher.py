"""Dynamic batching: merge concurrent requests into batches under a size cap and a delay.

Requests enter a FIFO as *items* (one or more rows of one job kind). While a
batch is running, the batcher loop waits until the oldest item has either
enough same-kind rows behind it to fill the cap or has waited ``max_delay``;
when no batch is running it sends the queue at once (``wait_when_idle=False``,
the default), because waiting for company then only adds latency: requests
that arrive meanwhile form the next, larger batch. It then takes rows of
that kind in arrival order, assembles one array (token rows right-padded),
and runs the batch without waiting for it, up to a limit of batches in
flight so that, under load, requests pile up into larger batches instead of
queueing at the replicas. Each item gets exactly its own rows of the output.
The cap is fixed, or moved by :class:`AIMDBatchCap` as in Clipper.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Gauge

from distml.serve.metrics import ServeMetrics
from distml.serve.pool import JobFailed

RunBatch = Callable[[str, list[np.ndarray]], Awaitable[list[np.ndarray]]]
#: (job params, arrays, on_frame) -> result arrays; on_frame gets each streamed frame.
RunGenerate = Callable[
    [dict[str, Any], list[np.ndarray], Callable[[dict[str, Any]], None]],
    Awaitable[list[np.ndarray]],
]


class FixedBatchCap:
    def __init__(self, size: int) -> None:
        self.value = size

    def observe(self, latency_s: float) -> None:
        """A fixed cap ignores latency."""


class AIMDBatchCap:
    """Additive increase while a window's p99 batch latency meets the target, else halve.

    After every ``window`` observed batches the cap grows by ``increase`` if the
    window's 99th-percentile latency is below ``target_s`` and is multiplied by
    ``decrease`` otherwise, within ``[1, max_size]`` (Crankshaw et al., Clipper, 2017).
    """

    def __init__(
        self,
        max_size: int,
        target_s: float,
        initial: int = 1,
        increase: int = 1,
        decrease: float = 0.5,
        window: int = 8,
    ) -> None:
        self.max_size = max_size
        self.target_s = target_s
        self.value = max(1, min(initial, max_size))
        self.increase = increase
        self.decrease = decrease
        self.window = window
        self._latencies: list[float] = []

    def observe(self, latency_s: float) -> None:
        self._latencies.append(latency_s)
        if len(self._latencies) < self.window:
            return
        p99 = float(np.percentile(self._latencies, 99))
        self._latencies.clear()
        if p99 < self.target_s:
            self.value = min(self.max_size, self.value + self.increase)
        else:
            self.value = max(1, int(self.value * self.decrease))


@dataclass
class _Item:
    kind: str
    rows: list[np.ndarray]
    future: asyncio.Future[list[np.ndarray]]
    arrived: float = field(default_factory=time.monotonic)
    #: Per-request data a subclass's batches need besides the rows (e.g. sampling params).
    extra: Any = None


def assemble(kind: str, rows: list[np.ndarray]) -> list[np.ndarray]:
    """The job arrays of a batch: stacked inputs, or right-padded token ids plus lengths."""
    if kind == "classify":
        return [np.stack(rows)]
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return [ids, lengths]


def split(kind: str, output: np.ndarray, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each row's own output (token outputs cut back to the row's length)."""
    if kind == "classify":
        return list(output)
    return [output[i, : len(row)] for i, row in enumerate(rows)]


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        cap: FixedBatchCap | AIMDBatchCap,
        max_delay_s: float,
        max_inflight: Callable[[], int],
        metrics: ServeMetrics,
        wait_when_idle: bool = False,
    ) -> None:
        self._run_batch = run_batch
        self.cap = cap
        self.max_delay_s = max_delay_s
        self.wait_when_idle = wait_when_idle
        self._max_inflight = max_inflight
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._size_metric = metrics.batch_size
        self._latency_metric = metrics.batch_latency
        self._cap_metric: Gauge | None = metrics.batch_cap
        metrics.batch_cap.set(cap.value)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, kind: str, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Queue ``rows`` and wait for their outputs (cancel the await to give up)."""
        return await self.enqueue(kind, rows)

    def enqueue(
        self, kind: str, rows: list[np.ndarray], extra: Any = None
    ) -> asyncio.Future[list[np.ndarray]]:
        """Queue ``rows`` now; the returned future gets their outputs (cancel it to give up)."""
        if self._closing:
            raise JobFailed(503, "server is shutting down")
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(kind, rows, future, extra=extra))
        self._wake.set()
        return future

    async def close(self) -> None:
        """Stop taking requests, run everything queued, wait for batches in flight."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # ------------------------------------------------------------------ loop
    async def _wait(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _loop(self) -> None:
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # the caller timed out or disconnected
            if not self._queue:
                if self._closing:
                    return
                await self._wait(None)
                continue
            if len(self._inflight) >= max(1, self._max_inflight()):
                await self._wait(0.05)
                continue
            head = self._queue[0]
            cap = self.cap.value
            queued = sum(len(i.rows) for i in self._queue if i.kind == head.kind)
            left = head.arrived + self.max_delay_s - time.monotonic()
            busy = bool(self._inflight) or self.wait_when_idle
            if queued < cap and left > 0 and busy and not self._closing:
                await self._wait(left)
                continue
            batch = self._take(head.kind, cap)
            task = asyncio.get_running_loop().create_task(self._execute(head.kind, batch))
            self._inflight.add(task)
            task.add_done_callback(self._batch_done)

    def _take(self, kind: str, cap: int) -> list[_Item]:
        """Items of ``kind`` in arrival order up to ``cap`` rows (at least one item)."""
        taken: list[_Item] = []
        rows = 0
        keep: deque[_Item] = deque()
        for item in self._queue:
            fits = rows == 0 or rows + len(item.rows) <= cap
            if item.kind == kind and fits and not item.future.done() and rows < cap:
                taken.append(item)
                rows += len(item.rows)
            elif not item.future.done():
                keep.append(item)
        self._queue = keep
        return taken

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _outputs(self, kind: str, items: list[_Item]) -> list[np.ndarray]:
        """One output per row of ``items``, in order (subclasses run other job kinds)."""
        rows = [row for item in items for row in item.rows]
        output = await self._run_batch(kind, assemble(kind, rows))
        return split(kind, output[0], rows)

    async def _execute(self, kind: str, items: list[_Item]) -> None:
        self._size_metric.observe(sum(len(item.rows) for item in items))
        start = time.monotonic()
        try:
            outputs = await self._outputs(kind, items)
        except Exception as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        elapsed = time.monotonic() - start
        self._latency_metric.observe(elapsed)
        self.cap.observe(elapsed)
        if self._cap_metric is not None:
            self._cap_metric.set(self.cap.value)
        at = 0
        for item in items:
            mine = outputs[at : at + len(item.rows)]
            at += len(item.rows)
            if not item.future.done():
                item.future.set_result(mine)


@dataclass(frozen=True)
class GenerateRequest:
    """What one /v1/generate caller adds to a generation batch besides its prompt."""

    params: dict[str, Any]
    #: Called from a pool thread with each token of a streamed request.
    on_token: Callable[[int], None] | None = None


class GenerationBatcher(DynamicBatcher):
    """Batches generation requests (one prompt each) into one batched ``generate`` job.

    Prompts are right-padded into one array; each row keeps its own sampling
    parameters and the replica decodes the rows together (see
    :mod:`distml.serve.generation`). Streamed tokens come back tagged with
    their row and are handed to that request's ``on_token``. The cap is
    fixed: generation batches take much longer than predictions, so they
    neither feed nor report the adaptive cap, and they have their own metrics.
    """

    def __init__(
        self,
        run_generate: RunGenerate,
        max_size: int,
        max_delay_s: float,
        max_inflight: Callable[[], int],
        metrics: ServeMetrics,
        wait_when_idle: bool = False,
    ) -> None:
        super().__init__(
            _no_batch, FixedBatchCap(max_size), max_delay_s, max_inflight, metrics, wait_when_idle
        )
        self._run_generate = run_generate
        self._size_metric = metrics.generate_batch_size
        self._latency_metric = metrics.generate_batch_latency
        self._cap_metric = None

    def enqueue_prompt(
        self, prompt: np.ndarray, request: GenerateRequest
    ) -> asyncio.Future[list[np.ndarray]]:
        """Queue one prompt; the future gets ``[new_tokens]``."""
        return self.enqueue("generate", [prompt], request)

    async def _outputs(self, kind: str, items: list[_Item]) -> list[np.ndarray]:
        requests: list[GenerateRequest] = [item.extra for item in items]
        rows = [item.rows[0] for item in items]
        params = {"rows": [{**r.params, "stream": r.on_token is not None} for r in requests]}

        def on_frame(message: dict[str, Any]) -> None:
            callback = requests[int(message["row"])].on_token
            if callback is not None:
                callback(int(message["token"]))

        out = await self._run_generate(params, assemble("tokens", rows), on_frame)
        return [out[0][i, : int(r.params["max_new_tokens"])] for i, r in enumerate(requests)]


async def _no_batch(kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    raise AssertionError("GenerationBatcher runs batches through run_generate")
