"""Per-stage compute intervals of a pipeline step, for the bubble measurement.

:class:`StageTimer` wraps the compute entry points of torch's
``PipelineStage`` objects on this rank (``forward_one_chunk``,
``backward_one_chunk``, ``backward_weight_one_chunk``; the schedule does the
sends and receives outside them) and records when each ran. Over a step,
busy = the sum of the intervals and idle fraction = 1 - busy / step wall time:
the measured bubble plus communication waits of this rank.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_COMPUTE = {
    "forward_one_chunk": "F",
    "backward_one_chunk": "B",
    "backward_weight_one_chunk": "W",
}


@dataclass
class StepTiming:
    """One step on one rank; intervals are (kind, stage, start, end) in s from the step start."""

    total_s: float
    intervals: list[tuple[str, int, float, float]] = field(default_factory=list)

    @property
    def busy_s(self) -> float:
        return sum(end - start for _, _, start, end in self.intervals)

    @property
    def idle_fraction(self) -> float:
        return 0.0 if self.total_s <= 0 else max(0.0, 1.0 - self.busy_s / self.total_s)


class StageTimer:
    """Records compute intervals of the given pipeline stages (all on this rank)."""

    def __init__(self, stages: list[Any]) -> None:
        self._t0 = 0.0
        self._intervals: list[tuple[str, int, float, float]] = []
        for stage in stages:
            for method, kind in _COMPUTE.items():
                if hasattr(stage, method):
                    original = getattr(stage, method)
                    setattr(stage, method, self._wrap(original, kind, stage.stage_index))

    def _wrap(self, fn: Callable[..., Any], kind: str, index: int) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._intervals.append(
                    (kind, index, start - self._t0, time.perf_counter() - self._t0)
                )

        return timed

    def start(self) -> None:
        self._intervals = []
        self._t0 = time.perf_counter()

    def stop(self) -> StepTiming:
        return StepTiming(time.perf_counter() - self._t0, list(self._intervals))
