"""Pipeline-parallel training over the mesh's ``pp`` axis with torch.distributed.pipelining.

:func:`build_pipeline` cuts a plain model into ``pp x virtual_stages``
stages, keeps this rank's :class:`StageModule`s, wraps them in torch's
``PipelineStage`` and builds the GPipe, 1F1B or interleaved-1F1B schedule.
:meth:`Pipeline.step` runs forward and backward over the micro-batches and
leaves the gradients in the plain model's parameters, ready for an ordinary
optimizer built on that model (parameters of other ranks' stages simply get
no gradient). Tied embeddings (``wte`` on the first stage, ``lm_head`` on the
last) stay one parameter object per process; each side computes its own
gradient and :meth:`Pipeline.step` sums the two over a first/last-stage group,
so both copies take identical updates. With ``precision="bf16"`` every stage
runs its forward under bf16 autocast and passes fp32 activations on (the
stage boundary casts back), so the schedule's buffers and gradients between
stages keep the dtype of the master weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    ScheduleInterleaved1F1B,
)

from distml.errors import ConfigError
from distml.parallel.mesh import axis_group, axis_rank, axis_size, require_axes
from distml.parallel.pipeline.prefetch import make_schedule
from distml.parallel.pipeline.split import (
    BALANCES,
    bounds_from_split_points,
    check_pipeline_plan,
    partition,
)
from distml.parallel.pipeline.stage import (
    ModelParts,
    StageModule,
    model_parts,
    param_costs,
    time_costs,
)
from distml.parallel.pipeline.timing import StageTimer, StepTiming

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE_INDEX = -100


class TokenWeightedLoss:
    """A micro-batch's mean loss re-weighted so the step's loss is the whole batch's mean.

    The schedule averages micro-batch losses (and their gradients) with equal
    weight. When targets carry ``-100`` (masked-LM positions that do not count),
    micro-batches hold different numbers of counted tokens and that average is
    not the batch's token mean a single process computes. Each micro-batch's
    loss is scaled by (its counted tokens) / (the batch's counted tokens / M),
    which :meth:`Pipeline.step` sets from the targets; without ignored targets
    the factor is exactly 1.
    """

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn
        self.tokens_per_microbatch: float | None = None
        #: fp16 loss scaling: backward runs on loss x scale (the step's losses divide it out).
        self.loss_scale = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_mb = self.tokens_per_microbatch
        if per_mb is None or targets.is_floating_point():
            weight = 1.0
        else:
            counted = int((targets != IGNORE_INDEX).sum())
            if counted == 0:  # nothing counts here: a zero that keeps the graph connected
                return logits.sum() * 0.0
            weight = counted / per_mb
        factor = weight * self.loss_scale
        loss = self.loss_fn(logits, targets)
        return loss * factor if factor != 1.0 else loss

    def set_batch(self, targets: torch.Tensor | None, microbatches: int) -> None:
        if targets is None or targets.is_floating_point():
            self.tokens_per_microbatch = None
            return
        total = int((targets != IGNORE_INDEX).sum())
        self.tokens_per_microbatch = total / microbatches if total else None


def plan_stage_bounds(
    model: nn.Module,
    stages: int,
    *,
    balance: str = "params",
    split_points: Sequence[int | str] | None = None,
    example_input: torch.Tensor | None = None,
) -> list[range]:
    """Block ranges of all ``stages`` stages (same answer on every rank)."""
    parts = model_parts(model)
    n_blocks = len(model.blocks)  # type: ignore[arg-type]
    if split_points is not None:
        return bounds_from_split_points(split_points, n_blocks, stages)
    if balance == "params":
        blocks, embed, head = param_costs(model, parts)
    elif balance == "time":
        if example_input is None:
            raise ConfigError(
                "parallel.pp_balance=time needs an example input batch to time the blocks; "
                "pass example_input or use pp_balance=params"
            )
        blocks, embed, head = time_costs(model, parts, example_input)
    else:
        raise ConfigError(
            f"unknown pipeline balance {balance!r} (parallel.pp_balance); "
            f"choose one of: {', '.join(BALANCES)}"
        )
    return partition(blocks, stages, embed, head)


def _tie_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """This rank's group of {first, last} pipeline ranks at the same other coordinates."""
    names = list(mesh.mesh_dim_names or ())
    grid = mesh.mesh.movedim(names.index("pp"), -1)
    lines = grid.reshape(-1, grid.shape[-1])
    pairs = [[int(line[0]), int(line[-1])] for line in lines]
    # Every rank must take part in creating every group, even those it is not in.
    mine, _ = dist.new_subgroups_by_enumeration(pairs)
    return mine


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them."""

    def __init__(
        self,
        model: nn.Module,
        parts: ModelParts,
        modules: list[StageModule],
        stages: list[Any],
        schedule: Any,
        group: dist.ProcessGroup,
        tie_group: dist.ProcessGroup | None,
        microbatches: int,
        loss: TokenWeightedLoss | None = None,
    ) -> None:
        self.model = model
        self.parts = parts
        self.modules = modules
        self.stages = stages
        self.schedule = schedule
        self.group = group
        self.tie_group = tie_group
        self.microbatches = microbatches
        self.loss = loss
        self.timer = StageTimer(stages)
        self.last_timing = StepTiming(0.0)

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of this rank's stages (each once)."""
        seen: set[int] = set()
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def duplicate_parameters(self) -> list[nn.Parameter]:
        """Tied parameters whose equal gradient the first stage's rank already holds."""
        if self.tie_group is None or self.has_first or not self.has_last:
            return []
        return [self.model.get_parameter(last) for _, last in self.parts.tied]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of the model's state dict, under the model's own keys."""
        out: dict[str, torch.Tensor] = {}
        for module in self.modules:
            out.update(module.state_dict())
        return out

    def step(
        self,
        inputs: torch.Tensor | None,
        targets: torch.Tensor | None,
        *,
        broadcast_loss: bool = False,
        loss_scale: float = 1.0,
    ) -> float | None:
        """Forward and backward of one batch in micro-batches; gradients land in the model.

        ``inputs`` are needed on the rank holding the first stage and ``targets``
        on the rank holding the last (others may pass them or None). Returns the
        mean micro-batch loss on the last stage's rank (on every rank of the
        pipeline with ``broadcast_loss``), else None. Gradients are the mean over
        micro-batches, as for a single pass over the whole batch, times
        ``loss_scale`` (fp16 loss scaling; the returned loss is unscaled).
        """
        self._check_batch(inputs, targets)
        if self.loss is not None:
            self.loss.set_batch(targets if self.has_last else None, self.microbatches)
            self.loss.loss_scale = loss_scale
        losses: list[torch.Tensor] = []
        self.timer.start()
        args = (inputs,) if self.has_first else ()
        self.schedule.step(
            *args,
            target=targets if self.has_last else None,
            losses=losses if self.has_last else None,
            return_outputs=False,
        )
        # The bubble is the schedule's: stop the clock before the tied-weight all-reduce.
        self.last_timing = self.timer.stop()
        self._sum_tied_grads()
        loss = torch.stack([x.detach() for x in losses]).mean() if losses else None
        if loss is not None and loss_scale != 1.0:
            loss = loss / loss_scale
        if not broadcast_loss:
            return None if loss is None else float(loss)
        value = torch.zeros((), dtype=torch.float64) if loss is None else loss.double()
        dist.broadcast(value, group=self.group, group_src=dist.get_world_size(self.group) - 1)
        return float(value)

    @torch.no_grad()
    def evaluate(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None
    ) -> tuple[float | None, torch.Tensor | None]:
        """Forward only: (mean micro-batch loss, logits) on the last stage's rank, else Nones."""
        self._check_batch(inputs, targets)
        if self.loss is not None:
            self.loss.set_batch(targets if self.has_last else None, self.microbatches)
            self.loss.loss_scale = 1.0
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        logits = self.schedule.eval(
            *args,
            target=targets if self.has_last else None,
            losses=losses if self.has_last else None,
        )
        if not self.has_last:
            return None, None
        return float(torch.stack(losses).mean()), logits

    def _check_batch(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> None:
        # Any batch given is checked on every rank, so no stage waits for a peer that raised.
        batch = inputs if inputs is not None else targets
        if batch is not None and batch.shape[0] % self.microbatches:
            raise ConfigError(
                f"a batch of {batch.shape[0]} samples does not split into "
                f"parallel.pp_microbatches={self.microbatches} equal micro-batches; make the "
                f"per-replica batch a multiple of {self.microbatches}"
            )

    def _sum_tied_grads(self) -> None:
        if self.tie_group is None:
            return
        for first_name, last_name in self.parts.tied:
            name = first_name if self.has_first else last_name
            param = self.model.get_parameter(name)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.tie_group)


def build_pipeline(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    schedule: str = "1f1b",
    microbatches: int = 4,
    virtual_stages: int = 1,
    balance: str = "params",
    split_points: Sequence[int | str] | None = None,
    loss_fn: LossFn | None = None,
    example_input: torch.Tensor | None = None,
    precision: str = "fp32",
) -> Pipeline:
    """Pipeline ``model`` over the mesh's ``pp`` axis (apply tensor parallelism first, if any).

    ``loss_fn(logits, targets)`` defaults to the model's LM loss (vocabulary-
    parallel under tensor parallelism with sharded logits). Rank r of the pp
    axis holds stages r, r + pp, ... (``virtual_stages`` of them). ``precision``
    (fp32 or bf16) is the autocast of the stages' forward passes.
    """
    from distml.parallel.tensor.plan import tensor_parallel_loss

    require_axes(mesh, "pp")
    parts = model_parts(model)
    pp, rank = axis_size(mesh, "pp"), axis_rank(mesh, "pp")
    group = axis_group(mesh, "pp")
    n_blocks = len(model.blocks)  # type: ignore[arg-type]
    check_pipeline_plan(n_blocks, pp, schedule, microbatches, virtual_stages)
    total = pp * virtual_stages
    bounds = plan_stage_bounds(
        model, total, balance=balance, split_points=split_points, example_input=example_input
    )
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if (mesh.device_type == "cuda")
        else torch.device(mesh.device_type)
    )
    indices = [rank + v * pp for v in range(virtual_stages)]
    modules = [
        StageModule(model, parts, bounds[i], i == 0, i == total - 1, precision=precision)
        for i in indices
    ]
    stages: list[Any] = [
        PipelineStage(m, i, total, device, group=group)
        for m, i in zip(modules, indices, strict=True)
    ]
    loss = TokenWeightedLoss(loss_fn or tensor_parallel_loss(model))
    runner: Any
    if schedule in ("gpipe", "1f1b"):
        runner = make_schedule(schedule, stages[0], microbatches, loss)
    else:
        runner = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss)
    tie_group = _tie_group(mesh) if parts.tied and pp > 1 else None
    return Pipeline(model, parts, modules, stages, runner, group, tie_group, microbatches, loss)
