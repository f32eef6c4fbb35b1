"""Parallelism strategies that wrap a plain model for the one training loop.

``ddp`` (all-reduce), ``ps`` (parameter servers) and ``mesh`` (dp x pp x tp
model parallelism, chosen when ``parallel.pp`` or ``parallel.tp`` > 1) plug
into the Trainer through :func:`build_strategy`.
"""

from distml.parallel.base import Strategy
from distml.parallel.ddp import DDPStrategy
from distml.parallel.mesh_strategy import MeshStrategy, build_strategy

__all__ = ["DDPStrategy", "MeshStrategy", "Strategy", "build_strategy"]
