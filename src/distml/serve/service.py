"""The model service behind the HTTP app: replicas, batchers, autoscaler and metrics.

:class:`ModelService` owns the parts and their order of start and stop: the
replica pool first (and wait until it can serve), then the batcher loops (one
for predictions, one that merges generation requests) and the autoscaler; on
shutdown the batchers drain what is queued, the pool
finishes what is in flight, and only then are replicas stopped. Its methods
return plain arrays for the HTTP layer to format and raise
:class:`~distml.serve.pool.JobFailed` with an HTTP status on failure.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from distml.data.text import ByteTokenizer, Tokenizer
from distml.serve.autoscale import Autoscaler
from distml.serve.batcher import (
    AIMDBatchCap,
    DynamicBatcher,
    FixedBatchCap,
    GenerateRequest,
    GenerationBatcher,
)
from distml.serve.inputs import ModelInputs, model_inputs
from distml.serve.metrics import ServeMetrics
from distml.serve.pool import Job, ReplicaPool
from distml.serve.runner import read_model_meta, tokenizer_from_meta
from distml.serve.settings import ServeSettings

_DONE = object()


class TokenText:
    """Turns generated ids into text piece by piece (bytes are decoded incrementally)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._utf8.decode(bytes([token])) if token < 256 else ""
        return self.tokenizer.decode([token])

    def flush(self) -> str:
        return (
            self._utf8.decode(b"", final=True) if isinstance(self.tokenizer, ByteTokenizer) else ""
        )


class ModelService:
    def __init__(self, model_path: str, settings: ServeSettings) -> None:
        self.model_path = model_path
        self.settings = settings
        self.meta = read_model_meta(model_path)
        self.tokenizer = tokenizer_from_meta(self.meta)
        self.inputs: ModelInputs = model_inputs(self.meta, self.tokenizer)
        self.metrics = ServeMetrics()
        self.pool = ReplicaPool(model_path, settings, self.metrics)
        self.batcher: DynamicBatcher | None = None
        self.generation: GenerationBatcher | None = None
        self.autoscaler: Autoscaler | None = None
        #: HTTP requests inside predict/generate (waiting, batched or running).
        self.active_requests = 0

    @property
    def task(self) -> str:
        return self.inputs.task

    def _batcher_depth(self) -> int:
        return sum(b.depth() for b in (self.batcher, self.generation) if b is not None)

    def queue_depth(self) -> int:
        return self._batcher_depth() + self.pool.pending_count()

    def load(self) -> float:
        """Requests waiting or running, the autoscaler's signal.

        Counted per HTTP request, not per pool job: a batch of 30 requests is one job,
        but it is 30 callers' worth of load.
        """
        return float(self.active_requests)

    async def start(self) -> None:
        s = self.settings
        self.pool.start()
        await asyncio.to_thread(self.pool.wait_ready, max(1, s.replicas), s.startup_timeout_s)
        cap: FixedBatchCap | AIMDBatchCap = (
            AIMDBatchCap(s.max_batch_size, s.target_p99_ms / 1000.0)
            if s.adaptive_batching
            else FixedBatchCap(s.max_batch_size)
        )
        self.batcher = DynamicBatcher(
            self._run_batch,
            cap,
            s.max_delay_ms / 1000.0,
            # One batch computing and one waiting per replica keeps them busy without
            # taking rows away from the next, larger batch.
            lambda: 2 * max(1, self.pool.ready_count()),
            self.metrics,
            s.wait_when_idle,
        )
        self.batcher.start()
        self.generation = GenerationBatcher(
            self._run_generate,
            s.max_batch_size,
            s.max_delay_ms / 1000.0,
            # One generation batch per replica: requests that arrive meanwhile wait and
            # join the next batch instead of queueing behind a long one at a replica.
            lambda: max(1, self.pool.ready_count()),
            self.metrics,
            s.wait_when_idle,
        )
        self.generation.start()
        self.metrics.track_queue_depth(self.queue_depth)
        if s.autoscaling:
            self.autoscaler = Autoscaler(self.pool, self.load, s, self.metrics)
            self.autoscaler.start()

    async def stop(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
        for batcher in (self.batcher, self.generation):
            if batcher is not None:
                await batcher.close()
        await asyncio.to_thread(self.pool.close, self.settings.request_timeout_s)

    async def _run_batch(self, kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        job = Job(kind, {}, arrays)
        _, out = await asyncio.wrap_future(self.pool.submit(job))
        return out

    async def _run_generate(
        self,
        params: dict[str, Any],
        arrays: list[np.ndarray],
        on_frame: Callable[[dict[str, Any]], None],
    ) -> list[np.ndarray]:
        job = Job("generate", params, arrays, on_token=on_frame)
        _, out = await asyncio.wrap_future(self.pool.submit(job))
        return out

    async def predict(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Per-row model outputs (logits), batched with concurrent requests."""
        assert self.batcher is not None, "service not started"
        self.active_requests += 1
        try:
            return await asyncio.wait_for(
                self.batcher.submit(self.inputs.kind, rows), self.settings.request_timeout_s
            )
        finally:
            self.active_requests -= 1

    async def generate(self, prompt: np.ndarray, params: dict[str, Any]) -> list[int]:
        """The new tokens for ``prompt``, decoded in a batch with concurrent requests."""
        assert self.generation is not None, "service not started"
        self.active_requests += 1
        try:
            future = self.generation.enqueue_prompt(prompt, GenerateRequest(params))
            out = await asyncio.wait_for(future, self.settings.request_timeout_s)
        finally:
            self.active_requests -= 1
        return [int(t) for t in out[0]]

    async def generate_stream(
        self, prompt: np.ndarray, params: dict[str, Any]
    ) -> AsyncIterator[int]:
        """Yield each generated token as the replica produces it."""
        assert self.generation is not None, "service not started"
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[Any] = asyncio.Queue()

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        future = self.generation.enqueue_prompt(prompt, GenerateRequest(params, on_token))
        # Tokens and the result are scheduled in order from one reader thread: the sentinel
        # (queued by the batch's completion on this loop) comes after the last token.
        future.add_done_callback(lambda _: tokens.put_nowait(_DONE))
        self.active_requests += 1
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                item = await asyncio.wait_for(tokens.get(), left)
                if item is _DONE:
                    break
                yield item
            future.result()  # raises JobFailed if the replica died mid-stream
        finally:
            self.active_requests -= 1
            if not future.done():
                future.cancel()
