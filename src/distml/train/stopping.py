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


class StepSync:
    """Per-step agreement on stopping, carrying the global mean loss for free.

    ``submit`` launches this step's all-reduce of ``[stop flag, local loss]`` and
    completes the previous step's, so the metrics line of step k is written when
    step k+1 ends (or at ``drain``) with the loss averaged over all data ranks.
    """

    def __init__(
        self, distributed: bool, device: torch.device, group: Any = None, world: int = 1
    ) -> None:
        self.requested = False
        self.signal_name = ""
        if distributed and group is not None and dist.get_world_size(group) == 1:
            # A data group of one rank (ps async/ssp workers train independently): nothing
            # to agree on, and the loss is this rank's own.
            distributed, world = False, 1
        self._distributed = distributed
        self._device = device
        self._group = group
        self._world = world
        self._pending: tuple[Any, torch.Tensor, dict[str, Any] | None] | None = None
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

    def submit(
        self, local_loss: float, record: dict[str, Any] | None
    ) -> tuple[bool, dict[str, Any] | None]:
        """(stop now?, the previous step's record with its global loss) on every data rank."""
        if not self._distributed:
            return self.requested, record
        stop, finished = self._complete()
        values = torch.tensor(
            [1.0 if self.requested else 0.0, local_loss], dtype=torch.float64, device=self._device
        )
        work = dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._pending = (work, values, record)
        return stop, finished

    def drain(self) -> dict[str, Any] | None:
        """Complete the outstanding exchange (before other collectives); return its record."""
        return self._complete()[1]

    def _complete(self) -> tuple[bool, dict[str, Any] | None]:
        if self._pending is None:
            return False, None
        work, values, record = self._pending
        self._pending = None
        work.wait()
        flag, loss_sum = values.tolist()
        if record is not None:
            record["loss"] = loss_sum / self._world
        return flag > 0, record
