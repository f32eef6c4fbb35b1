"""The one training loop of distml.

:class:`Trainer` builds data, model, optimizer and LR schedule from a
:class:`~distml.config.Config`, lets a parallel strategy wrap the model, and
runs epochs of global-batch steps with gradient accumulation (no gradient
sync on non-final micro-steps), optional bf16/fp16 autocast (fp16 with dynamic
loss scaling), per-epoch sharded evaluation, atomic checkpoints and a per-step
metrics file that splits step time into data loading, compute and communication.
Every parallelism plugs in as a strategy; there is no second loop.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.config import Config
from distml.data import DataBundle, GlobalBatchSampler, build_datasets, shard_range
from distml.data.text import CharTokenizer
from distml.errors import CheckpointError, ConfigError
from distml.memory.precision import LossScaler, autocast, check_strategy_support
from distml.models import get_model_spec, make_model_config
from distml.parallel import Strategy, build_strategy
from distml.parallel.mesh_checkpoint import resolve_resume
from distml.runtime.dist import DistContext, init_distributed
from distml.runtime.seed import capture_rng_state, restore_rng_state, seed_everything
from distml.runtime.timers import PhaseTimer
from distml.train.checkpoint import CheckpointManager, load_checkpoint
from distml.train.metrics import (
    MetricsWriter,
    StepTimes,
    bottleneck_report,
    task_loss,
    task_sums,
)
from distml.train.optim import build_optimizer
from distml.train.schedule import build_scheduler, scaled_lr
from distml.train.stopping import StepSync

Batch = tuple[torch.Tensor, torch.Tensor]


def check_model_data_compat(model_task: str, data_task: str, model: str, data: str) -> None:
    ok = (model_task == "classification") == (data_task == "classification")
    if "extractive_qa" in (model_task, data_task):
        ok = model_task == data_task
    if not ok:
        need = "a classification dataset" if model_task == "classification" else "data.name=text"
        if "extractive_qa" in (model_task, data_task):
            need = "data.name=squad" if model_task == "extractive_qa" else "model.name=bert-qa"
        raise ConfigError(
            f"model {model!r} ({model_task}) cannot train on dataset {data!r} ({data_task}); "
            f"use {need}"
        )


def build_model_for(cfg: Config, bundle: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """Build the configured model sized for the data; also return its resolved args."""
    spec = get_model_spec(cfg.model.name)
    check_model_data_compat(spec.task, bundle.info.task, cfg.model.name, cfg.data.name)
    model_cfg = make_model_config(cfg.model.name, cfg.model.args, bundle.info.model_defaults())
    return spec.build(model_cfg), dataclasses.asdict(model_cfg)


def tokenizer_state(bundle: DataBundle) -> dict[str, Any]:
    tok = bundle.info.extra.get("tokenizer")
    if isinstance(tok, CharTokenizer):
        return {"kind": "char", "chars": "".join(tok.chars)}
    if tok is not None:
        return {"kind": "byte"}
    return {}


class Trainer:
    """Train ``cfg`` on this process's share of the job described by ``ctx``."""

    def __init__(
        self, cfg: Config, ctx: DistContext | None = None, strategy: Strategy | None = None
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.parallel.backend, cfg.parallel.device)
        threads = cfg.parallel.threads_per_worker or max(
            1, (os.cpu_count() or 1) // max(1, self.ctx.local_world_size)
        )
        torch.set_num_threads(threads)
        spec = get_model_spec(cfg.model.name)
        self.task = spec.task
        self.bundle = build_datasets(cfg.data, cfg.seed, spec.task)
        # The mesh strategy autocasts its own forwards and refuses what it cannot run.
        self.strategy = strategy or build_strategy(
            cfg.parallel, precision=cfg.schedule.precision, recompute=cfg.memory.recompute
        )
        self.data_rank, self.data_world = self.strategy.data_partition(self.ctx)
        self.sampler = GlobalBatchSampler(
            len(self.bundle.train),
            cfg.data.global_batch_size,
            rank=self.data_rank,
            world_size=self.data_world,
            accumulation_steps=cfg.schedule.accumulation_steps,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )
        # Same seed on every rank for the model init (DDP also broadcasts rank 0's).
        seed_everything(cfg.seed)
        model, self.model_args = build_model_for(cfg, self.bundle)
        self.raw_model = model.to(self.ctx.device)
        # Different streams per rank afterwards (dropout must differ across shards).
        seed_everything(cfg.seed + 1 + self.ctx.rank)
        # Model-parallel plans reshape the model: the optimizer sees this rank's part only.
        self.train_module = self.strategy.prepare(self.raw_model, self.ctx, cfg.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        planned = cfg.schedule.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.schedule.max_steps or planned)
        self.peak_lr = scaled_lr(
            cfg.optimizer.lr,
            cfg.data.global_batch_size,
            cfg.schedule.lr_scaling,
            cfg.schedule.reference_batch_size,
        )
        check_strategy_support(
            cfg.schedule.precision,
            cfg.memory.offload_optimizer,
            cfg.parallel.strategy,
            model_parallel=cfg.parallel.pp > 1 or cfg.parallel.tp > 1,
        )
        self.optimizer = build_optimizer(
            self.train_module, cfg.optimizer, self.peak_lr, offload=cfg.memory.offload_optimizer
        )
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        # fp16 dynamic loss scaling; a pass-through for fp32 and bf16.
        self.scaler = LossScaler(
            cfg.schedule.precision,
            self.ctx.device.type,
            self.raw_model.parameters(),
            init_scale=cfg.schedule.loss_scale_init,
            sync_overflow=cfg.parallel.pp > 1 or cfg.parallel.tp > 1,
        )
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.dir or "checkpoints", cfg.checkpoint.keep_last
        )
        self.run_dir = Path(cfg.logging.run_dir)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from: Path | None = None
        self._maybe_resume()
        self.recompute_plan = self._apply_recompute()
        self.model = self.strategy.setup(self.raw_model, self.ctx)
        self.times = StepTimes()
        self.history: list[dict[str, Any]] = []

    def _apply_recompute(self) -> Any:
        """Activation checkpointing of the model's blocks per ``memory.recompute``."""
        mem = self.cfg.memory
        if mem.recompute == "none":
            return None
        from distml.memory.recompute import apply_recompute

        if not hasattr(self.raw_model, "blocks"):
            raise ConfigError(
                f"memory.recompute={mem.recompute} needs a model with blocks (gpt, bert, "
                f"resnet); {self.cfg.model.name!r} has none"
            )
        sample = targets = None
        if mem.recompute == "auto":
            first = next(self.sampler.epoch_batches(0))[0]
            sample, targets = self._load([first], 0)[0]
        task = self.task
        plan = apply_recompute(
            self.raw_model,
            mem.recompute,
            every_k=mem.every_k,
            module_types=tuple(mem.recompute_modules),
            budget_mb=mem.budget_mb,
            sample_input=sample,
            loss_fn=(lambda out: task_loss(out, targets, task)) if targets is not None else None,
            sync_group=self.strategy.data_group() if self.ctx.distributed else None,
        )
        if self.data_rank == 0:
            print(f"recompute: {plan.summary()}", flush=True)
        return plan

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (RNG gathered from all ranks)."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.data_world,
            "global_batch_size": self.cfg.data.global_batch_size,
            "rng_torch": self._gather_rng(),
            "rng_host": capture_rng_state(),
            "model_name": self.cfg.model.name,
            "model_args": self.model_args,
            "task": self.task,
            "input_shape": list(self.bundle.info.input_shape),
            "tokenizer": tokenizer_state(self.bundle),
            "config": self.cfg.to_dict(),
        }

    def _gather_rng(self) -> list[torch.Tensor]:
        state = torch.get_rng_state()
        if not self.ctx.distributed or self.data_world == 1:
            return [state]
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        local = state.to(device)
        gathered = [torch.empty_like(local) for _ in range(self.data_world)]
        dist.all_gather(gathered, local, group=self.strategy.data_group())
        return [g.cpu() for g in gathered]

    def _maybe_resume(self) -> None:
        from distml.parallel.mesh_checkpoint import is_sharded_checkpoint

        path = resolve_resume(self.checkpoints.directory, self.cfg.checkpoint.resume)
        if path is None:
            return
        if is_sharded_checkpoint(path):
            self._resume_sharded(path)
            return
        state = load_checkpoint(path, map_location=self.ctx.device)
        if state["model_name"] != self.cfg.model.name:
            raise CheckpointError(
                f"checkpoint {path} holds model {state['model_name']!r} but the config says "
                f"{self.cfg.model.name!r}; resume with the config that wrote it"
            )
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.scaler.load_state_dict(state.get("grad_scaler", {}))
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if state["global_batch_size"] != self.cfg.data.global_batch_size:
            # A different global batch changes what a step is: restart the epoch position.
            self.batch_in_epoch = 0
        if state["world_size"] == self.data_world:
            torch.set_rng_state(state["rng_torch"][self.data_rank].cpu())
            if self.data_rank == 0:
                restore_rng_state(state["rng_host"])
        else:
            seed_everything(self.cfg.seed + 1 + self.ctx.rank + 7919 * self.step)
        self.resumed_from = path

    def _resume_sharded(self, path: Path) -> None:
        """Resume from a sharded (model-parallel) checkpoint, written under any plan."""
        from distml.parallel.mesh_checkpoint import load_sharded_checkpoint

        state = load_sharded_checkpoint(
            path, self.raw_model, self.optimizer, model_name=self.cfg.model.name
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if state["global_batch_size"] != self.cfg.data.global_batch_size:
            self.batch_in_epoch = 0
        # Seeded by data rank so that the tp ranks of a replica keep equal dropout streams.
        seed_everything(self.cfg.seed + 1 + self.data_rank + 7919 * self.step)
        self.resumed_from = path

    def checkpoint_meta(self) -> dict[str, Any]:
        """The plain values of a checkpoint (for strategies that save tensors themselves)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_batch_size": self.cfg.data.global_batch_size,
            "model_name": self.cfg.model.name,
            "model_args": self.model_args,
            "task": self.task,
            "input_shape": list(self.bundle.info.input_shape),
            "tokenizer": tokenizer_state(self.bundle),
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        if self.strategy.owns_checkpoints:
            return self.strategy.save_checkpoint(self)
        state = self.state_dict()  # collective: every rank must call
        if self.data_rank == 0:
            return self.checkpoints.save(state, self.step)
        return None

    # ------------------------------------------------------------------ data
    def _load(self, indices: list[torch.Tensor], epoch: int) -> list[Batch]:
        dataset = self.bundle.train
        device = self.ctx.device
        out = []
        for idx in indices:
            x, y = dataset.get_batch(idx, epoch)
            out.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        return out

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[list[Batch], float]]:
        """This rank's micro-batches per step, with the seconds spent waiting for them."""
        plan = self.sampler.epoch_batches(epoch, start)
        if not self.cfg.data.prefetch:
            for indices in plan:
                t0 = time.perf_counter()
                batch = self._load(indices, epoch)
                yield batch, time.perf_counter() - t0
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[list[Batch]] | None = None
            for indices in plan:
                nxt = pool.submit(self._load, indices, epoch)
                if pending is not None:
                    t0 = time.perf_counter()
                    ready = pending.result()
                    yield ready, time.perf_counter() - t0
                pending = nxt
            if pending is not None:
                t0 = time.perf_counter()
                ready = pending.result()
                yield ready, time.perf_counter() - t0

    # ------------------------------------------------------------------ loop
    def _autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.cfg.schedule.precision, self.ctx.device.type)

    def train_step(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; returns (loss, exposed comm s)."""
        if not self.raw_model.training:
            # Setting the mode walks every submodule: only do it after evaluation.
            self.model.train()
        delegated = self.strategy.forward_backward(
            self.model, micro_batches, self.task, loss_scale=self.scaler.step_scale()
        )
        if delegated is not None:
            # Model parallelism: the strategy ran forward, backward and the dp all-reduce.
            if self.cfg.schedule.grad_clip is not None:
                self.scaler.unscale_()  # clip the true gradients, not the scaled ones
                self.strategy.clip_grad_norm_(self.raw_model, self.cfg.schedule.grad_clip)
            # fp16: skipped on every rank when a gradient overflowed on any.
            self.scaler.step(lambda: self.strategy.optimizer_step(self.optimizer))
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return delegated
        accum = len(micro_batches)
        loss_total = 0.0
        comm = 0.0
        for x, y in micro_batches[:-1]:
            with self.strategy.no_sync(self.model):
                with self._autocast():
                    logits = self.model(x)
                loss = task_loss(logits, y, self.task) / accum
                self.scaler.scale(loss).backward()
            loss_total += float(loss.detach())
        x, y = micro_batches[-1]
        with self._autocast():
            logits = self.model(x)
        loss = task_loss(logits, y, self.task)
        if accum > 1:
            loss = loss / accum
        self.strategy.begin_backward()
        self.scaler.scale(loss).backward()
        comm = self.strategy.exposed_comm_seconds(time.perf_counter())
        loss_total += float(loss.detach())
        if self.cfg.schedule.grad_clip is not None:
            self.scaler.unscale_()  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.schedule.grad_clip)
        # fp16: skipped (parameters untouched) when a gradient overflowed.
        self.scaler.step(lambda: self.strategy.optimizer_step(self.optimizer))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, comm

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss and accuracy on a split, sharded across ranks and reduced exactly."""
        dataset = self.bundle.test if split == "test" else self.bundle.train
        eval_ctx = dataclasses.replace(self.ctx, rank=self.data_rank, world_size=self.data_world)
        return evaluate_model(
            self.strategy.eval_module(self.raw_model),
            dataset,
            self.task,
            eval_ctx,
            self.cfg.data.eval_batch_size,
            self._autocast,
            group=self.strategy.data_group(),
        )

    def fit(self, until_step: int | None = None) -> dict[str, Any]:
        """Run the configured schedule; returns the summary.

        ``until_step`` stops early at that optimizer step, with a checkpoint, as an
        interrupted job would; a later ``Trainer`` with ``checkpoint.resume`` continues
        the same schedule.
        """
        from distml.train.progress import ProgressReporter

        if self.strategy.is_server(self.ctx):
            return self.strategy.serve(self)
        cfg = self.cfg
        main = self.strategy.reports(self.ctx, self.data_rank)
        metrics = MetricsWriter(
            self.run_dir / cfg.logging.metrics_file if main else None,
            append=self.resumed_from is not None,
        )
        reporter = ProgressReporter(
            enabled=main,
            bar=cfg.logging.progress,
            total_steps=self.total_steps,
            done_steps=self.step,
            title=cfg.name,
        )
        profiler = self._profiler()
        global_batch = cfg.data.global_batch_size
        start_wall = time.perf_counter()
        last_eval: dict[str, float] = {}
        timer = PhaseTimer(self.ctx.device)
        if main and self.resumed_from is not None:
            reporter.log(
                f"resumed from {self.resumed_from} at step {self.step} (epoch {self.epoch})"
            )
        flag_device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        stop = StepSync(
            self.ctx.distributed and self.data_world > 1,
            flag_device,
            self.strategy.data_group(),
            self.data_world,
        )

        def log_step(record: dict[str, Any] | None) -> None:
            if record is not None:
                metrics.write(record)

        stop.install()
        stopped = False
        try:
            while self.step < self.total_steps and self.epoch < cfg.schedule.epochs:
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                for batches, t_data in self._batches(self.epoch, self.batch_in_epoch):
                    timer.start()
                    loss, t_comm = self.train_step(batches)
                    t_work = timer.lap("work")
                    t_compute = max(0.0, t_work - t_comm)
                    t_step = t_data + t_work
                    self.step += 1
                    self.batch_in_epoch += 1
                    busy = self.strategy.comm_busy_seconds()
                    record: dict[str, Any] | None = None
                    if main:
                        self.times.add(t_data, t_compute, t_comm, t_step)
                        record = {
                            "step": self.step,
                            "epoch": self.epoch,
                            "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0],
                            "samples_per_s": global_batch / t_step if t_step > 0 else 0.0,
                            "t_data": t_data,
                            "t_compute": t_compute,
                            "t_comm": t_comm,
                            "t_comm_busy": busy,
                            "t_step": t_step,
                            **self.scaler.metrics(),
                        }
                    # Every data rank takes part: the global loss and the stop decision.
                    stop_now, finished = stop.submit(loss, record)
                    log_step(finished)
                    if main:
                        shown = finished["loss"] if finished is not None else loss
                        reporter.advance(loss=shown, epoch=self.epoch)
                    if profiler is not None:
                        profiler.step()
                    every = cfg.checkpoint.every_steps
                    if every and self.step % every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps or self.step == until_step:
                        break
                    if stop_now:
                        stopped = True
                        break
                log_step(stop.drain())  # evaluation and checkpoints issue their own collectives
                epoch_done = self.batch_in_epoch >= self.steps_per_epoch
                interrupted = stopped or (self.step == until_step and self.step < self.total_steps)
                if interrupted and not epoch_done:
                    self.save_checkpoint()
                    break
                # An interruption on an epoch's last step still finishes the epoch
                # (evaluation, epoch checkpoint), so the resumed run does not skip them.
                if epoch_done:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                evaluate_now = cfg.schedule.eval_every_epochs and (
                    (epoch_done and self.epoch % cfg.schedule.eval_every_epochs == 0)
                    or self.step >= self.total_steps
                )
                if evaluate_now:
                    last_eval = self.evaluate("test")
                    eval_record: dict[str, Any] = {
                        "event": "eval",
                        "step": self.step,
                        "epoch": self.epoch,
                        **last_eval,
                    }
                    self.history.append(eval_record)
                    if main:
                        metrics.write(eval_record)
                        reporter.log(
                            f"epoch {self.epoch:>3}  step {self.step:>6}  "
                            f"test loss {last_eval['loss']:.4f}  acc {last_eval['accuracy']:.4f}"
                        )
                if epoch_done or self.step >= self.total_steps:
                    self.save_checkpoint()
                if interrupted:
                    break
        finally:
            stop.uninstall()
            reporter.close()
            metrics.close()
            if profiler is not None:
                profiler.__exit__(None, None, None)
        if main and stopped:
            reporter.log(
                f"stopped on {stop.signal_name or 'request'} after step {self.step}; "
                f"checkpoint {self.checkpoints.path_for(self.step)} (resume with --resume)"
            )
        wall = time.perf_counter() - start_wall
        summary: dict[str, Any] = {
            "name": cfg.name,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "world_size": self.ctx.world_size,
            "backend": self.ctx.backend if self.ctx.distributed else "none",
            "device": str(self.ctx.device),
            "global_batch_size": global_batch,
            "accumulation_steps": cfg.schedule.accumulation_steps,
            "steps": self.step,
            "epochs": self.epoch,
            "wall_s": wall,
            "peak_lr": self.peak_lr,
            "test_loss": last_eval.get("loss"),
            "test_accuracy": last_eval.get("accuracy"),
            "checkpoint": str(resolve_resume(self.checkpoints.directory, "latest") or ""),
            "stopped_by_signal": stopped,
            **self.strategy.summary(),
            **self.scaler.metrics(),
        }
        if main:
            summary.update(bottleneck_report(self.times, global_batch))
            reporter.summary(summary)
        return summary

    def _profiler(self) -> Any:
        if not self.cfg.logging.profile:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        out = self.run_dir / f"trace_rank{self.ctx.rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.ctx.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        prof = profile(
            activities=activities,
            schedule=schedule(wait=1, warmup=1, active=self.cfg.logging.profile_steps, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(out)),
        )
        prof.__enter__()
        return prof


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    task: str,
    ctx: DistContext,
    batch_size: int,
    autocast: Any = nullcontext,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Sharded evaluation: each rank takes a contiguous shard, sums are all-reduced."""
    was_training = model.training
    model.eval()
    start, stop = shard_range(len(dataset), ctx.rank, ctx.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for lo in range(start, stop, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, stop))
            x, y = dataset.get_batch(idx, 0)
            x, y = x.to(ctx.device), y.to(ctx.device)
            with autocast():
                logits = model(x)
            loss, correct, count = task_sums(logits, y, task)
            sums += torch.stack([loss.double(), correct.double(), count.double()])
    if ctx.distributed:
        dist.all_reduce(sums, group=group)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": count}


def is_interactive() -> bool:
    return sys.stdout.isatty()
