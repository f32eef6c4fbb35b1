"""Parallelism strategies that wrap a plain model for the one training loop.

``ddp`` (all-reduce) and ``ps`` (parameter servers) plug into the Trainer; the
mesh, tensor and pipeline plans are applied to plain models (see docs).
"""

from distml.parallel.base import Strategy
from distml.parallel.ddp import DDPStrategy, build_strategy

__all__ = ["DDPStrategy", "Strategy", "build_strategy"]
