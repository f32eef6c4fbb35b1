"""The mesh strategy: data x pipeline x tensor parallelism inside the one training loop.

:class:`MeshStrategy` builds the (dp, pp, tp) mesh, shards the plain model
(tensor-parallel plan first, then the pipeline cut) before the trainer builds
its optimizer on this rank's parameters only, runs forward and backward of a
step (through the pipeline schedule when pp > 1, with the vocabulary-parallel
loss under tp), averages gradients over dp only and clips by the norm of the
whole distributed gradient. Each dp replica reads its own share of the
global batch; every pp and tp rank of a replica reads the same share. The
loss is the replica's on every rank, so rank 0 reports true numbers.
Checkpoints are sharded and plan-independent (:mod:`.mesh_checkpoint`).
:func:`check_mesh_plan` is the pre-launch check behind the one-line errors.

Memory settings compose with the mesh: ``schedule.precision=bf16`` runs every
forward (the tp model, each pipeline stage) under bf16 autocast with fp32
master weights, fp32 stage boundaries and an fp32 loss; ``memory.recompute``
full/every_k/selective wraps the blocks after the tp plan and the pipeline
stages call the wrappers (:meth:`MeshStrategy.setup`). fp16 scales the loss
inside the step (the trainer's scaler agrees on overflows over the world);
``recompute=auto`` is refused (:func:`check_mesh_memory`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distml.config import ParallelSection
from distml.errors import ConfigError
from distml.parallel.base import Strategy
from distml.parallel.mesh import (
    all_reduce_gradients,
    axis_rank,
    axis_size,
    build_mesh,
    check_parallel_dims,
    clip_grad_norm_,
)
from distml.runtime.dist import DistContext

Batch = tuple[torch.Tensor, torch.Tensor]


def uses_mesh(cfg: ParallelSection) -> bool:
    """True when the config asks for model parallelism (pp > 1 or tp > 1)."""
    return cfg.pp > 1 or cfg.tp > 1


def mesh_dims(cfg: ParallelSection, world_size: int) -> tuple[int, int, int]:
    """(dp, pp, tp), dp defaulting to world / (pp x tp); one-line error unless they fit."""
    dp = cfg.dp if cfg.dp is not None else max(1, world_size // (cfg.pp * cfg.tp))
    check_parallel_dims(dp, cfg.pp, cfg.tp, world_size)
    return dp, cfg.pp, cfg.tp


def microbatches(cfg: ParallelSection) -> int:
    return cfg.pp_microbatches or cfg.pp


def check_mesh_memory(precision: str = "fp32", recompute: str = "none") -> None:
    """One-line errors for the memory settings model parallelism cannot run."""
    if recompute == "auto":
        raise ConfigError(
            "memory.recompute=auto is not supported with parallel.pp/tp (its budget planner "
            "profiles the whole model in one process); use memory.recompute=full, every_k "
            "or selective"
        )


def check_mesh_plan(
    cfg: ParallelSection,
    world_size: int,
    model: nn.Module,
    *,
    global_batch: int | None = None,
    precision: str = "fp32",
    recompute: str = "none",
    seq_len: int | None = None,
) -> None:
    """Every check that fits on one line before workers start (model may live on ``meta``).

    ``seq_len`` (``data.seq_len``) is checked against tp under sequence
    parallelism; without it the model's first forward raises the same error.
    """
    from distml.models.bert import BERT
    from distml.models.gpt import GPT
    from distml.parallel.pipeline.hf_parts import hf_model_parts
    from distml.parallel.pipeline.split import (
        BALANCES,
        bounds_from_split_points,
        check_pipeline_plan,
    )
    from distml.parallel.tensor.hf_bert import is_hf_bert
    from distml.parallel.tensor.hf_gpt2 import is_hf_gpt2
    from distml.parallel.tensor.plan import check_tensor_parallel_sizes
    from distml.parallel.tensor.sequence import check_sequence_parallel

    if cfg.strategy != "ddp":
        raise ConfigError(
            f"parallel.strategy={cfg.strategy} cannot be combined with parallel.pp/tp; "
            "use parallel.strategy=ddp (the dp axis) with model parallelism"
        )
    dp, pp, tp = mesh_dims(cfg, world_size)
    hugging_face = is_hf_gpt2(model) or is_hf_bert(model)
    if hugging_face and pp > 1 and hf_model_parts(model) is None:
        raise ConfigError(
            f"pipeline parallelism has no stage plan for Hugging Face {type(model).__name__} "
            "(stage plans: hf-gpt2, hf-bert); use parallel.pp=1 (tensor parallelism works: "
            "parallel.tp)"
        )
    if not isinstance(model, GPT | BERT) and not hugging_face:
        raise ConfigError(
            f"model parallelism (parallel.pp/tp) has no plan for {type(model).__name__}; "
            "use model gpt, bert, bert-qa, hf-gpt2, hf-bert (or hf-bert-qa with tp), "
            "or parallel.pp=1 tp=1"
        )
    mcfg: Any = model.config
    if tp > 1:
        check_tensor_parallel_sizes(tp, mcfg.n_head, mcfg.n_embd, mcfg.vocab_size)
    if cfg.sequence_parallel:
        check_sequence_parallel(model, tp=tp, pp=pp, seq_len=seq_len)
    if pp > 1:
        m, v = microbatches(cfg), cfg.pp_virtual_stages
        check_pipeline_plan(mcfg.n_layer, pp, cfg.pp_schedule, m, v)
        if cfg.pp_balance not in BALANCES:
            raise ConfigError(
                f"unknown pipeline balance {cfg.pp_balance!r} (parallel.pp_balance); "
                f"choose one of: {', '.join(BALANCES)}"
            )
        if cfg.pp_split_points is not None:
            bounds_from_split_points(cfg.pp_split_points, mcfg.n_layer, pp * v)
        if global_batch is not None and (global_batch // dp) % m:
            raise ConfigError(
                f"parallel.pp_microbatches={m} does not divide the per-replica batch "
                f"{global_batch // dp} (data.global_batch_size / dp); choose a divisor"
            )
    check_mesh_memory(precision, recompute)


class LocalStages(nn.Module):
    """This rank's pipeline stages as one module: what the optimizer trains."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)


def release_other_stages(model: nn.Module, keep: set[int]) -> None:
    """Replace parameters this rank does not hold by meta tensors (frees their memory)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) not in keep and not p.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )


class MeshStrategy(Strategy):
    """dp x pp x tp on one DeviceMesh (see the module docstring).

    ``precision`` is ``schedule.precision`` (the autocast of the forward
    passes); ``recompute`` (``memory.recompute``) is only checked here, the
    trainer applies it.
    """

    name = "mesh"
    owns_checkpoints = True

    def __init__(
        self, cfg: ParallelSection, *, precision: str = "fp32", recompute: str = "none"
    ) -> None:
        # Also checked before launch; here for Trainers built directly from a config.
        check_mesh_memory(precision, recompute)
        self.cfg = cfg
        self.precision = precision
        self.mesh: DeviceMesh | None = None
        self.pipeline: Any = None
        self.model: nn.Module | None = None
        self.local: nn.Module | None = None
        self.loss_fn: Any = None

    def _mesh(self, ctx: DistContext | None = None) -> DeviceMesh:
        if self.mesh is None:
            if ctx is None:
                raise RuntimeError("the mesh strategy is used before data_partition/prepare")
            dp, pp, tp = mesh_dims(self.cfg, ctx.world_size)
            self.mesh = build_mesh(dp, pp, tp, device_type=ctx.device.type)
        return self.mesh

    # ---- data: one share per dp replica, the same for its pp and tp ranks
    def data_partition(self, ctx: DistContext) -> tuple[int, int]:
        mesh = self._mesh(ctx)
        return axis_rank(mesh, "dp"), axis_size(mesh, "dp")

    def data_group(self) -> Any:
        return self._mesh().get_group("dp")

    def reports(self, ctx: DistContext, data_rank: int) -> bool:
        return ctx.rank == 0

    # ---- model: tp plan, then the pipeline cut, before the optimizer
    def prepare(self, model: nn.Module, ctx: DistContext, seed: int) -> nn.Module:
        from distml.parallel.pipeline import build_pipeline
        from distml.parallel.tensor import (
            apply_tensor_parallel,
            check_sequence_parallel,
            tensor_parallel_loss,
        )
        from distml.runtime.seed import seed_everything

        mesh = self._mesh(ctx)
        # tp ranks of a replica must draw the same dropout masks: seed by dp rank.
        seed_everything(seed + 1 + axis_rank(mesh, "dp"))
        sp = self.cfg.sequence_parallel
        if sp:  # also checked before launch; here for Trainers built directly from a config
            check_sequence_parallel(model, tp=axis_size(mesh, "tp"), pp=self.cfg.pp)
        apply_tensor_parallel(model, mesh, sequence_parallel=sp)
        self.model = model
        self.loss_fn = tensor_parallel_loss(model)
        if self.cfg.pp == 1:
            self.local = model
            return model
        example = None
        if self.cfg.pp_balance == "time":
            mcfg: Any = getattr(model, "config", None)
            gen = torch.Generator().manual_seed(seed)
            example = torch.randint(mcfg.vocab_size, (2, mcfg.block_size), generator=gen).to(
                ctx.device
            )
        self.pipeline = build_pipeline(
            model,
            mesh,
            schedule=self.cfg.pp_schedule,
            microbatches=microbatches(self.cfg),
            virtual_stages=self.cfg.pp_virtual_stages,
            balance=self.cfg.pp_balance,
            split_points=self.cfg.pp_split_points,
            loss_fn=self.loss_fn,
            example_input=example,
            precision=self.precision,
        )
        self.local = LocalStages(self.pipeline.modules)
        release_other_stages(model, {id(p) for p in self.local.parameters()})
        return self.local

    def setup(self, model: nn.Module, ctx: DistContext) -> nn.Module:
        """Let the pipeline stages run the blocks as the trainer left them.

        The trainer applies ``memory.recompute`` after :meth:`prepare` (the tp
        plan has to replace layers inside plain blocks, and wrapping keeps the
        parameters, so the optimizer built in between is unaffected); full and
        every_k put wrappers into ``model.blocks``, which the stages cut earlier
        must pick up. Selective wrapping changes the blocks in place. With pp=1
        the model runs whole, wrappers included.
        """
        if self.pipeline is not None:
            for module in self.pipeline.modules:
                module.refresh_blocks(model)
        return model

    # ---- one step
    def forward_backward(
        self, model: nn.Module, micro_batches: list[Batch], task: str, loss_scale: float = 1.0
    ) -> tuple[float, float]:
        from distml.memory.precision import autocast

        assert self.local is not None
        if self.pipeline is not None:
            # The pipeline splits the replica's batch into its own micro-batches.
            x = torch.cat([b[0] for b in micro_batches])
            y = torch.cat([b[1] for b in micro_batches])
            loss = self.pipeline.step(x, y, broadcast_loss=True, loss_scale=loss_scale)
            assert loss is not None
        else:
            loss, accum = 0.0, len(micro_batches)
            for x, y in micro_batches:
                # Autocast the forward only; the loss takes fp32 logits (as task_loss does)
                # and backward runs outside autocast, as in the trainer's own loop.
                with autocast(self.precision, x.device.type):
                    logits = model(x)
                part = self.loss_fn(logits.float(), y) / accum
                (part * loss_scale if loss_scale != 1.0 else part).backward()
                loss += float(part.detach())
        start = time.perf_counter()
        all_reduce_gradients(self.local, self._mesh(), "dp")
        return float(loss), time.perf_counter() - start

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        assert self.local is not None
        skip = self.pipeline.duplicate_parameters() if self.pipeline is not None else []
        return clip_grad_norm_(self.local, self._mesh(), max_norm, skip=skip)

    # ---- evaluation, inference and checkpoints
    def eval_module(self, model: nn.Module) -> nn.Module:
        from distml.parallel.mesh_inference import MeshForward

        stages: dict[int, Any] = {}
        total = 1
        if self.pipeline is not None:
            for module, stage in zip(self.pipeline.modules, self.pipeline.stages, strict=True):
                stages[stage.stage_index] = module
                total = stage.num_stages
        return MeshForward(model, self._mesh(), stages, total, microbatches(self.cfg))

    def save_checkpoint(self, trainer: Any) -> Path | None:
        from distml.memory.recompute import recompute_unwrapped
        from distml.parallel.mesh_checkpoint import save_sharded_checkpoint

        # The trainer (duck-typed: parallel/ does not import train/) gives the plain values.
        meta = trainer.checkpoint_meta()
        meta["plan"] = dict(zip(("dp", "pp", "tp"), self._mesh().mesh.shape, strict=True))
        # The checkpoint matches tp shards and optimizer state to state-dict keys by module
        # and parameter names; recompute wrappers would add an "inner" segment to those.
        with recompute_unwrapped(trainer.raw_model) as plain:
            return save_sharded_checkpoint(
                trainer.checkpoints.directory,
                trainer.step,
                plain,
                trainer.optimizer,
                meta,
                trainer.checkpoints.keep_last,
            )

    def summary(self) -> dict[str, Any]:
        mesh = self._mesh()
        out: dict[str, Any] = {
            "mesh": {axis: axis_size(mesh, axis) for axis in ("dp", "pp", "tp")},
        }
        if self.pipeline is not None:
            out["pp_schedule"] = self.cfg.pp_schedule
            out["pp_microbatches"] = microbatches(self.cfg)
            out["pp_idle_fraction"] = self.pipeline.last_timing.idle_fraction
        return out


def build_strategy(
    cfg: ParallelSection, *, precision: str = "fp32", recompute: str = "none"
) -> Strategy:
    """The strategy the config asks for: the mesh with pp/tp > 1, else ``parallel.strategy``.

    ``precision`` and ``recompute`` (``schedule.precision``, ``memory.recompute``)
    matter to the mesh only; other strategies run under the trainer's own autocast.
    """
    from distml.parallel.ddp import build_strategy as build_plain

    if uses_mesh(cfg):
        return MeshStrategy(cfg, precision=precision, recompute=recompute)
    return build_plain(cfg)


def check_inference_plan(cfg: ParallelSection, world_size: int, checkpoint: str) -> None:
    """One-line errors for a model-parallel ``distml predict`` before workers start."""
    from distml.models import get_model_spec, make_model_config

    if Path(checkpoint).is_dir():
        from distml.parallel.mesh_checkpoint import read_meta

        meta = read_meta(checkpoint)
    else:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = meta["model_name"]
    with torch.device("meta"):
        model = get_model_spec(name).build(make_model_config(name, meta["model_args"]))
    # Inference has no micro-batch schedule: check the layout only.
    layout = cfg.model_copy(update={"pp_schedule": "gpipe", "pp_microbatches": 1})
    check_mesh_plan(layout, world_size, model)


def inference_model(model: nn.Module, cfg: ParallelSection, ctx: DistContext) -> nn.Module:
    """``model`` (whole, same on every rank) sharded per ``cfg``: full logits on every rank."""
    from distml.parallel.mesh_inference import build_inference_forward

    dp, pp, tp = mesh_dims(cfg, ctx.world_size)
    mesh = build_mesh(dp, pp, tp, device_type=ctx.device.type)
    return build_inference_forward(
        model,
        mesh,
        virtual_stages=cfg.pp_virtual_stages,
        balance=cfg.pp_balance,
        split_points=cfg.pp_split_points,
        microbatches=microbatches(cfg),
    )
