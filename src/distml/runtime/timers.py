"""Wall-clock phase timers for the step-time split (data, compute, communication).

On CUDA the timer synchronises the device at phase boundaries so that the
split is real rather than kernel-launch time; on CPU it is plain
``time.perf_counter``.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Accumulates seconds per named phase; ``lap(name)`` closes the running phase."""

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._mark = time.perf_counter()

    def start(self) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> float:
        if self._sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = now - self._mark
        self.totals[phase] += elapsed
        self._mark = now
        return elapsed

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def reset(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out
