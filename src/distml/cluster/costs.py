"""The simulator's cost model: what preemption, migration, splitting and packing cost.

Speeds are fractions of a job's speed alone on as few nodes as it needs.
A job spread over more nodes than necessary runs at ``split_speed``; each job of
a packed pair runs at ``packing_speed`` (so packing pays off iff
``2 * packing_speed > 1``); an elastic job's speed scales linearly with the GPUs
it holds. Suspending and resuming, migrating and resizing each stall the job
for a fixed number of seconds (checkpoint save + restore) while it holds GPUs.

GPU utilization: a job alone keeps its GPUs busy only a fraction ``u`` of the
time (input pipeline, host work, communication). With ``gpu_util`` = 1 (the
default) every job saturates its GPUs and a packed job runs at the fixed
``packing_speed``. With ``gpu_util`` < 1 each job draws ``u`` from a Beta
distribution with that mean (seeded by job id), and a packed pair shares the
GPU: each runs at ``packing_overhead * min(1, 1 / (u_a + u_b))`` of its alone
speed, so pairs that together need less than one GPU barely slow down. Useful
work is ``u`` x GPUs x speed: what the GPUs really compute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

from distml.errors import ConfigError


@dataclass(frozen=True)
class CostModel:
    """Costs in seconds, speeds as fractions of alone speed."""

    suspend_resume_cost: float = 30.0
    migration_cost: float = 30.0
    resize_cost: float = 10.0
    split_speed: float = 0.7
    packing_speed: float = 0.6
    schedule_interval: float | None = None
    gpu_util: float = 1.0
    gpu_util_concentration: float = 4.0
    packing_overhead: float = 0.9

    def __post_init__(self) -> None:
        for name in ("suspend_resume_cost", "migration_cost", "resize_cost"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("split_speed", "packing_speed", "gpu_util", "packing_overhead"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.gpu_util_concentration <= 0:
            raise ConfigError(
                f"gpu_util_concentration must be > 0, got {self.gpu_util_concentration}"
            )
        if self.schedule_interval is not None and self.schedule_interval <= 0:
            raise ConfigError(
                f"schedule_interval must be > 0 seconds or None, got {self.schedule_interval}"
            )

    def job_gpu_util(self, job_id: int) -> float:
        """Fraction of time job ``job_id`` keeps its GPUs busy alone (1.0 in the default model)."""
        if self.gpu_util >= 1.0:
            return 1.0
        k = self.gpu_util_concentration
        draw = random.Random(job_id).betavariate(k * self.gpu_util, k * (1.0 - self.gpu_util))
        return min(1.0, max(0.02, draw))  # a job that never touches its GPU is no job

    def packed_speeds(self, util_a: float, util_b: float) -> tuple[float, float]:
        """Speeds (fractions of alone speed) of two jobs sharing one GPU."""
        if self.gpu_util >= 1.0:
            return self.packing_speed, self.packing_speed
        speed = self.packing_overhead * min(1.0, 1.0 / (util_a + util_b))
        return speed, speed

    @classmethod
    def from_options(cls, **options: Any) -> CostModel:
        """Build from keyword options, naming unknown ones in a ConfigError."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown cost option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        return cls(**options)
