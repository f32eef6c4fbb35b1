"""Pipeline (inter-layer) parallelism: stages of blocks run by torch.distributed.pipelining.

:func:`build_pipeline` splits a plain model over the mesh's ``pp`` axis
(balanced by parameters, by measured time, or at named split points) and
returns a :class:`Pipeline` whose ``step`` runs GPipe, 1F1B or interleaved
1F1B over micro-batches and records per-stage compute intervals.
"""

from distml.parallel.pipeline.runner import Pipeline, build_pipeline, plan_stage_bounds
from distml.parallel.pipeline.split import (
    BALANCES,
    SCHEDULES,
    bounds_from_split_points,
    check_pipeline_plan,
    partition,
)
from distml.parallel.pipeline.stage import ModelParts, StageModule, model_parts
from distml.parallel.pipeline.timing import StageTimer, StepTiming

__all__ = [
    "BALANCES",
    "SCHEDULES",
    "ModelParts",
    "Pipeline",
    "StageModule",
    "StageTimer",
    "StepTiming",
    "bounds_from_split_points",
    "build_pipeline",
    "check_pipeline_plan",
    "model_parts",
    "partition",
    "plan_stage_bounds",
]
