"""Graceful stop on SIGTERM or SIGUSR1: finish the step, checkpoint, exit 0.

Schedulers (and ``distml cluster``) suspend a job by signalling it. Each rank
sets a flag in its handler; the ranks agree on the stop step with a one-float
MAX all-reduce launched asynchronously after every step and read one step
later, so the agreement costs no waiting in the common case and every rank
stops after the same step. The job then writes a checkpoint and exits 0; it
resumes with ``--resume`` on any number of workers.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Signal-driven stop flag with a distributed agreement on when to stop."""

    def __init__(self, distributed: bool, device: torch.device, group: Any = None) -> None:
        self.requested = False
        self.signal_name = ""
        self._distributed = distributed
        self._device = device
        self._group = group
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Called once per step on every data rank; True on all ranks at the same step."""
        if not self._distributed:
            return self.requested
        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = bool(flag.item() > 0)
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self._device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return decided

    def drain(self) -> None:
        """Complete the outstanding agreement so collectives stay matched across ranks."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
