"""Data parallelism by all-reduce: torch's DistributedDataParallel, instrumented.

Gradients are averaged by DDP's bucketed all-reduce, overlapped with the
backward pass. A thin communication hook records when each bucket's
all-reduce is launched and when it completes, which yields two honest
numbers per step: *busy* communication time (may overlap compute) and
*exposed* communication time (backward time after the last bucket was
launched, i.e. the wait for the network once the computation is done).
"""

import threading
import time
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distml.config import ParallelSection
from distml.parallel.base import Strategy
from distml.runtime.dist import DistContext


class _CommTimer:
    """State of the timing hook: last launch time and busy seconds."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.last_launch = 0.0
        self.busy = 0.0
        self.lock = threading.Lock()


def _timed_allreduce_hook(
    state: _CommTimer, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    start = time.perf_counter()
    state.last_launch = start
    world = dist.get_world_size(state.group)
    buffer.div_(world)
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    assert work is not None

    def finish(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        with state.lock:
            state.busy += time.perf_counter() - start
        return fut.value()[0]

    return work.get_future().then(finish)  # type: ignore[no-any-return]


class DDPStrategy(Strategy):
    """All-reduce data parallelism over the default process group."""

    name = "ddp"

    def __init__(self, cfg: ParallelSection) -> None:
        self.cfg = cfg
        self._timer: "_CommTimer | None" = None
        self._backward_start = 0.0

    def setup(self, model: nn.Module, ctx: DistContext) -> nn.Module:
        if not ctx.distributed:
            return model
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model,
            device_ids=device_ids,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            find_unused_parameters=self.cfg.find_unused_parameters,
            gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
        )
        self._timer = _CommTimer(None)
        ddp.register_comm_hook(self._timer, _timed_allreduce_hook)
        return ddp

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        if isinstance(model, DistributedDataParallel):
            return model.no_sync()
        return super().no_sync(model)

    def begin_backward(self) -> None:
        self._backward_start = time.perf_counter()
        if self._timer is not None:
            self._timer.last_launch = self._backward_start

    def exposed_comm_seconds(self, backward_end: float) -> float:
        if self._timer is None:
            return 0.0
        return max(0.0, backward_end - max(self._timer.last_launch, self._backward_start))

    def comm_busy_seconds(self) -> float:
        if self._timer is None:
            return 0.0
        with self._timer.lock:
            busy, self._timer.busy = self._timer.busy, 0.0
        return busy


def build_strategy(cfg: ParallelSection) -> Strategy:
    """The strategy named by ``parallel.strategy``."""
    if cfg.strategy == "ddp":
        return DDPStrategy(cfg)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")
