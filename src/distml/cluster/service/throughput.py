"""Measured throughput of live runs, from the step records of their metrics files.

A :class:`RunMonitor` tails one run's ``metrics.jsonl`` and measures samples
per second in its current *context*: alone on its slots, or sharing its slot
with a packed mate that is itself training. When the context changes the
window restarts and the records read at that moment only mark its start, so a
window never mixes speeds from before and after. Alone, the rate becomes the
job's solo throughput (per worker count, and per training signature so a job
with the same model, data and batch can borrow it before it ever ran alone).
Packed, the rate divided by the solo rate is the normalized throughput
that packing policies compare with 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any

SOLO: tuple[str] = ("solo",)


def training_signature(config: dict[str, Any]) -> str:
    """A hash of what sets a job's speed (model, data, optimizer, precision, strategy)."""
    schedule = config.get("schedule", {})
    parallel = dict(config.get("parallel", {}))
    parallel.pop("nproc", None)
    key = {
        "model": config.get("model"),
        "data": config.get("data"),
        "optimizer": (config.get("optimizer") or {}).get("name"),
        "precision": schedule.get("precision"),
        "accumulation": schedule.get("accumulation_steps"),
        "parallel": parallel,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MetricsTail:
    """New complete JSON lines of a growing file, from a byte offset."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""

    @classmethod
    def at_end(cls, path: Path) -> MetricsTail:
        try:
            return cls(path, path.stat().st_size)
        except OSError:
            return cls(path, 0)

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def last_step_record(path: Path) -> dict[str, Any] | None:
    """The last per-step record (not an eval line) of a metrics file."""
    last = None
    for record in MetricsTail(path).read():
        if "event" not in record and "loss" in record:
            last = record
    return last


class RunMonitor:
    """Progress and throughput of one live run.

    The rate is wall-clock: samples of the steps that arrived (each record's
    ``samples_per_s`` x ``t_step``) over the time between the first and last
    arrival in the window. A per-step median would miss time-sharing on CPU,
    where a step is shorter than the OS time slice and the waiting falls
    between steps; the metrics file arrives in buffered chunks, and counting
    from chunk to chunk keeps the estimate unbiased.
    """

    def __init__(self, metrics: Path, *, from_end: bool = False) -> None:
        self.tail = MetricsTail.at_end(metrics) if from_end else MetricsTail(metrics)
        self.first_step_at: float | None = None
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.steps_seen = 0  # step records of this run read so far
        self.context: Hashable = None
        self.context_since = 0.0
        self.reported = False
        self._opened: float | None = None  # first arrival in this context (not counted)
        self._last = 0.0
        self._samples = 0.0
        self._steps = 0
        self.last_rate: float | None = None

    def set_context(self, context: Hashable, now: float) -> bool:
        """Switch to ``context``; True if it changed (the rate window restarts)."""
        if context == self.context:
            return False
        self.context = context
        self.context_since = now
        self.reported = False
        self._opened = None
        self._samples = 0.0
        self._steps = 0
        return True

    def poll(self, now: float) -> int:
        """Read new records; returns how many step records arrived."""
        steps = [
            r
            for r in self.tail.read()
            if "event" not in r and "samples_per_s" in r and "t_step" in r
        ]
        if not steps:
            return 0
        if self.first_step_at is None:
            self.first_step_at = now
        self.steps_seen += len(steps)
        self.last_step = int(steps[-1]["step"])
        self.last_loss = float(steps[-1]["loss"])
        if self._opened is None:
            # Partly written before the context began: only marks the window's start.
            self._opened = now
            return len(steps)
        self._samples += sum(float(r["samples_per_s"]) * float(r["t_step"]) for r in steps)
        self._steps += len(steps)
        self._last = now
        return len(steps)

    def rate(self, min_steps: int, min_seconds: float) -> float | None:
        """Samples/s in the current context, once enough steps and time were seen."""
        if self._opened is None or self._steps < min_steps:
            return None
        span = self._last - self._opened
        if span <= 0 or span < min_seconds:
            return None
        self.last_rate = self._samples / span
        return self.last_rate


class SoloRates:
    """Solo samples/s by (job, workers) and by (training signature, workers)."""

    def __init__(self) -> None:
        self._by_job: dict[tuple[int, int], float] = {}
        self._by_signature: dict[tuple[str, int], float] = {}

    def record(self, job_id: int, signature: str, nproc: int, rate: float) -> bool:
        """Store a solo rate; True when it is the job's first."""
        first = (job_id, nproc) not in self._by_job
        self._by_job[(job_id, nproc)] = rate
        self._by_signature[(signature, nproc)] = rate
        return first

    def get(self, job_id: int, signature: str, nproc: int) -> tuple[float, str] | None:
        """(rate, source) where source says whether it is the job's own or borrowed."""
        own = self._by_job.get((job_id, nproc))
        if own is not None:
            return own, "its own solo rate"
        other = self._by_signature.get((signature, nproc))
        if other is not None:
            return other, "the solo rate of a job with the same training signature"
        return None
