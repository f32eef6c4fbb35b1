"""``parallel.strategy: ps`` - the parameter server as a strategy of the one Trainer.

Roles: ranks ``0 .. W-1`` are workers and ranks ``W .. W+S-1`` are servers.
Workers first keeps global rank 0 a worker, so the Trainer's rank-0 progress,
metrics and checkpoints, and the launcher's "result of rank 0", are a
worker's, and a worker's data rank equals its global rank (the same sampler
shards as DDP on W ranks). Servers run :meth:`PSStrategy.serve` instead of
the loop. Workers replace ``optimizer.step()`` by push-and-pull; servers
apply a shard-local clone of the Trainer's optimizer (same class, groups and
hyperparameters) at the Trainer's LR schedule. Checkpoints: worker 0 asks
every server for its shard (parameters and optimizer state) and stores them
in whole-model form in the checkpoint's ``strategy`` entry, so one atomic
file holds everything and a resume may use another number of servers.

In ``async`` and ``ssp`` modes workers never wait for each other outside the
servers' own gating: each worker's "data group" is a group of itself alone,
so the Trainer's per-step stop/loss exchange and its evaluation stay local
(a worker reports the loss and test metrics of its own shard), and worker 0
writes checkpoints without gathering the others' RNG states. That is what
lets a dead worker be dropped while the rest train on (with
:func:`distml.launch.launcher.launch` tolerating the death), and what lets
ssp workers drift up to ``staleness`` steps apart under the Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.comm.codecs import CODEC_NAMES
from distml.config import ParallelSection
from distml.errors import ConfigError
from distml.parallel.base import Strategy
from distml.parallel.ps import transport as wire
from distml.parallel.ps.server import ParameterServer
from distml.parallel.ps.shard import Shard, assemble_full, is_elementwise
from distml.parallel.ps.sharding import ShardPlan, plan_shards
from distml.parallel.ps.worker import PSClient
from distml.runtime.dist import DistContext


def ps_world_size(cfg: ParallelSection) -> int:
    """Processes a ps job needs: servers + workers."""
    return cfg.servers + cfg.workers


def check_ps_settings(cfg: ParallelSection, world_size: int | None = None) -> None:
    """Validate the ps fields (and the world size when given); one-line ConfigErrors."""
    if cfg.strategy != "ps":
        return
    if cfg.servers < 1:
        raise ConfigError(
            f"parallel.servers must be at least 1 for strategy ps, got {cfg.servers}; "
            "set parallel.servers=1 or more"
        )
    if cfg.workers < 1:
        raise ConfigError(
            f"parallel.workers must be at least 1 for strategy ps, got {cfg.workers}; "
            "set parallel.workers=1 or more"
        )
    if cfg.staleness < 0:
        raise ConfigError(
            f"parallel.staleness must be >= 0, got {cfg.staleness}; "
            "use 0 for lockstep or a positive bound for ssp"
        )
    if cfg.ps_codec not in CODEC_NAMES:
        raise ConfigError(
            f"unknown parallel.ps_codec {cfg.ps_codec!r}; choose one of: {', '.join(CODEC_NAMES)}"
        )
    need = ps_world_size(cfg)
    if world_size is not None and world_size != need:
        raise ConfigError(
            f"strategy ps needs parallel.servers + parallel.workers = {cfg.servers} + "
            f"{cfg.workers} = {need} processes but the job has {world_size}; "
            f"set parallel.nproc={need} or change servers/workers"
        )


class PSStrategy(Strategy):
    """Parameter-server data parallelism: S servers own the parameters, W workers train."""

    name = "ps"

    def __init__(self, cfg: ParallelSection) -> None:
        check_ps_settings(cfg)
        self.cfg = cfg
        self.num_servers = cfg.servers
        self.num_workers = cfg.workers
        self.server: ParameterServer | None = None
        self.plan: ShardPlan | None = None
        self._client: PSClient | None = None
        self._group: dist.ProcessGroup | None = None
        self._solo: dist.ProcessGroup | None = None
        self._named: list[tuple[str, nn.Parameter]] = []
        self._ctx = DistContext()
        self._comm_device = torch.device("cpu")
        self._pending: dict[str, Any] = {}
        self._busy_since_last = 0.0
        self._done = False

    # ------------------------------------------------------------- roles
    @property
    def server_ranks(self) -> list[int]:
        return list(range(self.num_workers, self.num_workers + self.num_servers))

    def is_server(self, ctx: DistContext) -> bool:
        check_ps_settings(self.cfg, ctx.world_size)
        return ctx.rank >= self.num_workers

    def data_partition(self, ctx: DistContext) -> tuple[int, int]:
        check_ps_settings(self.cfg, ctx.world_size)
        # Servers take no data; rank 0's share keeps their (unused) sampler valid.
        return (ctx.rank if ctx.rank < self.num_workers else 0), self.num_workers

    @property
    def independent_workers(self) -> bool:
        """True when workers must not wait for each other (async and ssp)."""
        return self.cfg.consistency in ("async", "ssp")

    def data_group(self) -> dist.ProcessGroup | None:
        return self._solo if self.independent_workers else self._group

    @property
    def owns_checkpoints(self) -> bool:  # type: ignore[override]
        return self.independent_workers

    def save_checkpoint(self, trainer: Any) -> Path | None:
        """async/ssp: worker 0 alone writes the checkpoint (no collective among workers)."""
        if trainer.data_rank != 0:
            return None
        # The Trainer gathers every data rank's RNG state when data_world > 1; async workers
        # may be gone, so store worker 0's alone (world_size 1): a resume reseeds the others.
        data_world = trainer.data_world
        trainer.data_world = 1
        try:
            state = trainer.state_dict()
        finally:
            trainer.data_world = data_world
        path: Path = trainer.checkpoints.save(state, trainer.step)
        return path

    def setup(self, model: nn.Module, ctx: DistContext) -> nn.Module:
        check_ps_settings(self.cfg, ctx.world_size)
        self._ctx = ctx
        self._comm_device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
        # Every rank (servers too) must take part in creating the workers' group.
        self._group = dist.new_group(list(range(self.num_workers)))
        if self.independent_workers:
            for worker in range(self.num_workers):  # every rank creates every group
                solo = dist.new_group([worker])
                if worker == ctx.rank:
                    self._solo = solo
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return model

    def _plan(self, optimizer: torch.optim.Optimizer) -> ShardPlan:
        if self.plan is None:
            self.plan = plan_shards(self._named, self.num_servers, is_elementwise(optimizer))
        return self.plan

    # ----------------------------------------------------------- workers
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._client is None:
            self._client = PSClient(
                self._plan(optimizer),
                [p for _, p in self._named],
                self.server_ranks,
                codec=self.cfg.ps_codec,
                seed=self._ctx.rank,
                comm_device=self._comm_device,
            )
        self._client.push_pull()
        self._busy_since_last += self._client.last_seconds
        # The update happened on the servers; tell torch's LR scheduler it did happen.
        setattr(optimizer, "_opt_called", True)  # noqa: B010

    def exposed_comm_seconds(self, backward_end: float) -> float:
        # The Trainer asks right after backward, before this step's push-pull: report the
        # previous step's exchange (the worker waits for all of it), one step late.
        return self._client.last_seconds if self._client is not None else 0.0

    def comm_busy_seconds(self) -> float:
        busy, self._busy_since_last = self._busy_since_last, 0.0
        return busy

    def state_dict(self) -> dict[str, Any]:
        if self._client is None or self._ctx.rank != 0:
            return {}  # only data rank 0's state is saved
        plan = self._client.plan
        shapes = {n: tuple(p.shape) for n, p in self._named}
        dtypes = {n: p.dtype for n, p in self._named}
        full = assemble_full(plan, self._client.fetch_state(), shapes, dtypes)
        return {"ps": {"servers": self.num_servers, **full}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state.get("ps", {}))

    def summary(self) -> dict[str, Any]:
        # The Trainer builds its summary once the loop is over: tell the servers we are done.
        if not self._done and self._ctx.rank < self.num_workers and self._group is not None:
            self._done = True
            if self._client is not None:
                self._client.close()
            else:
                for rank in self.server_ranks:
                    wire.send_header([wire.DONE], rank, self._comm_device)
        out: dict[str, Any] = {
            "ps_servers": self.num_servers,
            "ps_workers": self.num_workers,
            "ps_consistency": self.cfg.consistency,
            "ps_codec": self.cfg.ps_codec,
        }
        if self._client is not None:
            out["ps_push_pull_s"] = self._client.total_seconds
            out["ps_compression_ratio"] = self._client.encoder.compression_ratio
            out["ps_server_bytes"] = self._client.plan.server_bytes()
        return out

    # ----------------------------------------------------------- servers
    def serve(self, trainer: Any) -> dict[str, Any]:
        ctx: DistContext = trainer.ctx
        index = ctx.rank - self.num_workers
        plan = self._plan(trainer.optimizer)
        shard = Shard(plan, index, [p for _, p in self._named], trainer.optimizer, ctx.device)
        if self._pending.get("params"):
            shard.load_full(self._pending)
        scheduler = trainer.scheduler
        bases = list(scheduler.base_lrs)
        lambdas = list(scheduler.lr_lambdas)

        def lr_at(step: int) -> list[float]:
            return [base * fn(step) for base, fn in zip(bases, lambdas, strict=True)]

        if index == 0:
            print(
                f"parameter servers: {self.num_servers}, workers: {self.num_workers}, "
                f"consistency: {self.cfg.consistency}, codec: {self.cfg.ps_codec}\n"
                f"{plan.table()}",
                flush=True,
            )
        self.server = ParameterServer(
            plan,
            index,
            list(range(self.num_workers)),
            shard,
            lr_at,
            consistency=self.cfg.consistency,
            staleness=self.cfg.staleness,
            codec=self.cfg.ps_codec,
            start_step=trainer.step,
            final_step=trainer.total_steps,
            comm_device=self._comm_device,
        )
        return self.server.serve()
