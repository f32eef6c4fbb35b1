"""The simulator's cost model: what preemption, migration, splitting and packing cost.

Speeds are fractions of a job's speed alone on as few nodes as it needs.
A job spread over more nodes than necessary runs at ``split_speed``; each job of
a packed pair runs at ``packing_speed`` (so packing pays off iff
``2 * packing_speed > 1``); an elastic job's speed scales linearly with the GPUs
it holds. Suspending and resuming, migrating and resizing each stall the job
for a fixed number of seconds (checkpoint save + restore) while it holds GPUs.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for name in ("suspend_resume_cost", "migration_cost", "resize_cost"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("split_speed", "packing_speed"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.schedule_interval is not None and self.schedule_interval <= 0:
            raise ConfigError(
                f"schedule_interval must be > 0 seconds or None, got {self.schedule_interval}"
            )

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
