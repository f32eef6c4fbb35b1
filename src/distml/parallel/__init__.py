"""Parallelism strategies that wrap a plain model for the one training loop."""

from distml.parallel.base import Strategy
from distml.parallel.ddp import DDPStrategy, build_strategy

__all__ = ["DDPStrategy", "Strategy", "build_strategy"]
