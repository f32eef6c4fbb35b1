"""Data parallelism by all-reduce: torch's DistributedDataParallel, instrumented.

Gradients are averaged by DDP's bucketed all-reduce, overlapped with the
backward pass. The step reports *exposed* communication time: backward time
after the last bucket was launched, i.e. the wait for the network once the
computation is done. With DDP's built-in C++ all-reduce that moment is taken
from gradient-ready hooks on the first layers' parameters (whose bucket goes
last); when a compression or distml all-reduce hook is configured, a wrapper
around it also records each bucket's in-flight (*busy*) time.
"""

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distml.config import ParallelSection
from distml.errors import ConfigError
from distml.parallel.base import Strategy
from distml.runtime.dist import DistContext


class _CommTimer:
    """State of the timing hook: the wrapped hook, last launch time and busy seconds."""

    def __init__(
        self,
        group: "dist.ProcessGroup | None",
        inner_state: Any = None,
        inner_hook: "Callable[..., torch.futures.Future[torch.Tensor]] | None" = None,
    ) -> None:
        self.group = group
        # Cached: the hook runs once per bucket per step and this call is not free.
        self.world_size = dist.get_world_size(group)
        self.inner_state = inner_state
        self.inner_hook = inner_hook
        self.last_launch = 0.0
        self.busy = 0.0
        self.lock = threading.Lock()


def _timed_hook(state: _CommTimer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    start = time.perf_counter()
    state.last_launch = start

    def finish(fut: torch.futures.Future[Any]) -> torch.Tensor:
        with state.lock:
            state.busy += time.perf_counter() - start
        value = fut.value()
        return value[0] if isinstance(value, list) else value

    if state.inner_hook is not None:
        return state.inner_hook(state.inner_state, bucket).then(finish)
    # Same arithmetic as DDP's built-in reducer: divide by the world, then sum.
    buffer = bucket.buffer()
    buffer.div_(state.world_size)
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    assert work is not None
    return work.get_future().then(finish)


class DDPStrategy(Strategy):
    """All-reduce data parallelism over the default process group."""

    name = "ddp"

    def __init__(self, cfg: ParallelSection) -> None:
        self.cfg = cfg
        self._timer: _CommTimer | None = None
        self._compression: Any = None
        self._pending_state: dict[str, Any] = {}
        self._backward_start = 0.0
        check_comm_settings(cfg)

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
        inner_state, inner_hook = self._inner_hook()
        self._compression = inner_state if hasattr(inner_state, "compression_ratio") else None
        self._timer = _CommTimer(None, inner_state, inner_hook)
        if inner_hook is not None:
            # Python hooks run anyway: wrap them to time every bucket.
            ddp.register_comm_hook(self._timer, _timed_hook)
        else:
            # Keep DDP's C++ all-reduce (a Python comm hook added ~0.5 ms of latency per
            # step on small models). The last bucket is launched when the gradients of
            # the first layers are ready, so stamp those: backward time after that
            # moment is communication the step waits for.
            timer = self._timer
            for param in list(model.parameters())[:4]:
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(
                        lambda _p: setattr(timer, "last_launch", time.perf_counter())
                    )
        if self._pending_state:
            self.load_state_dict(self._pending_state)
        return ddp

    def _inner_hook(self) -> tuple[Any, Any]:
        """The configured compression or all-reduce-algorithm hook (None: built-in all-reduce)."""
        cfg = self.cfg
        if cfg.compression != "none" and cfg.allreduce_algorithm != "builtin":
            raise ConfigError(
                "parallel.compression and parallel.allreduce_algorithm cannot be combined; "
                "set one of them to its default (none / builtin)"
            )
        if cfg.compression != "none":
            from distml.comm.compression import make_compression_hook

            return make_compression_hook(cfg.compression, None, **cfg.compression_options)
        if cfg.allreduce_algorithm != "builtin":
            from distml.comm.ddp_hooks import allreduce_algorithm_hook

            return allreduce_algorithm_hook(cfg.allreduce_algorithm)
        return None, None

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
        if self._timer is None or self._timer.inner_hook is None:
            return 0.0  # not observable without a Python comm hook
        with self._timer.lock:
            busy, self._timer.busy = self._timer.busy, 0.0
        return busy

    def state_dict(self) -> dict[str, Any]:
        if self._compression is None:
            return {}
        return {"compression": self._compression.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._compression is None:
            # Resume happens before setup() builds the hook: keep it for then.
            self._pending_state = dict(state)
            return
        if "compression" in state:
            self._compression.load_state_dict(state["compression"])
        self._pending_state = {}

    def summary(self) -> dict[str, Any]:
        if self._compression is None:
            return {}
        return {
            "compression": self.cfg.compression,
            "compression_ratio": self._compression.compression_ratio,
        }


def check_comm_settings(cfg: ParallelSection) -> None:
    """Validate compression and all-reduce names early (in the launching process)."""
    from distml.comm.compression import HOOK_NAMES, check_compression_options
    from distml.comm.ddp_hooks import HOOK_ALGORITHMS

    if cfg.compression not in HOOK_NAMES:
        raise ConfigError(
            f"unknown gradient compression {cfg.compression!r} (parallel.compression); "
            f"choose one of: {', '.join(HOOK_NAMES)}"
        )
    check_compression_options(cfg.compression, cfg.compression_options)
    if cfg.allreduce_algorithm not in ("builtin", *HOOK_ALGORITHMS):
        raise ConfigError(
            f"unknown all-reduce algorithm {cfg.allreduce_algorithm!r} "
            f"(parallel.allreduce_algorithm); choose one of: builtin, {', '.join(HOOK_ALGORITHMS)}"
        )


def build_strategy(cfg: ParallelSection) -> Strategy:
    """The strategy named by ``parallel.strategy``."""
    if cfg.strategy == "ddp":
        return DDPStrategy(cfg)
    if cfg.strategy == "ps":
        from distml.parallel.ps import PSStrategy

        return PSStrategy(cfg)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")
