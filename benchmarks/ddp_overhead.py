"""distml's DDP training step against a minimal hand-written torch DDP loop (issue 2).

Question: what does distml's one training loop cost on top of plain
``DistributedDataParallel``? Target: distml's median step time <= 1.03x the
hand-written loop's.

Both sides run in the same two processes (``distml.testing.run_ranks``: gloo,
CPU, one intra-op thread per rank) on the same model init (same seed, checked
equal), the same batches (index tensors from the Trainer's own
``GlobalBatchSampler``, gathered with ``dataset.get_batch``), the same
optimizer and LR, the same per-rank micro-batch and the same DDP settings
(``parallel.bucket_cap_mb`` and ``parallel.gradient_as_bucket_view`` from the
one config; no gradient accumulation, fp32, dropout 0 so no RNG enters):

* **distml**: a real ``Trainer`` built from the config. Each step draws this
  rank's micro-batches from ``Trainer._batches`` (the generator ``fit()``
  loads with, which also reports ``t_data``) and calls ``Trainer.train_step``
  (DDPStrategy's wrapped model with its timing comm hook, loss, optimizer and
  LR-scheduler step), timed with the same ``PhaseTimer`` as ``fit()``, which
  gives the data / compute / communication split. ``fit()``'s per-step
  bookkeeping (one JSON metrics line, the progress bar) is not included.
* **torch**: ``DistributedDataParallel`` with no hook, ``get_batch``,
  ``cross_entropy``, ``backward``, ``step``, ``zero_grad``, ``loss.item()``.

Each step is timed from fetching its batch to having its loss, identically on
both sides. After warmup the sides alternate in blocks of ``--steps`` steps,
the order flipping every repeat (A B, B A, ...) so drift and machine noise
hit both alike. Reported: median step time per side (median of block
medians), the ratio distml/torch (median over repeats of adjacent block
pairs, and of the two medians), samples/s, and distml's split; the same for
process CPU time per step (all threads), which a loaded machine distorts far
less than wall time because it does not count time spent descheduled. Since both
sides do the same math on the same batches, their losses and final
parameters must agree, which the report checks (and the smoke test asserts).

    python benchmarks/ddp_overhead.py [--steps N] [--repeats R] [--workloads cnn,gpt]
                                      [--out benchmarks/results/ddp_overhead.json] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    load_average,
    machine_info,
    median,
    print_table,
    write_json,
)
from distml.config import Config, build_config
from distml.data import DataBundle, GlobalBatchSampler
from distml.models import build_model
from distml.runtime.timers import PhaseTimer
from distml.testing import run_ranks
from distml.train.trainer import Trainer

TARGET_RATIO = 1.03
WORLD_SIZE = 2
SIDES = ("distml", "torch")
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
StateDict = dict[str, torch.Tensor]


def workload_config(
    name: str, text_path: str | Path | None = None, tiny: bool = False
) -> dict[str, Any]:
    """The config dict of workload ``name`` (``cnn`` or ``gpt``); ``tiny`` for smoke tests."""
    common: dict[str, Any] = {
        "seed": 0,
        # Constant LR: the hand-written loop needs no scheduler to do the same math.
        "schedule": {
            "epochs": 1000,
            "warmup_steps": 0,
            "decay": "constant",
            "eval_every_epochs": 0,
        },
        "parallel": {"backend": "gloo", "device": "cpu", "threads_per_worker": 1},
        "logging": {"progress": False},
    }
    if name == "cnn":
        channels = [8, 16] if tiny else [32, 64]
        return {
            **common,
            "name": "bench-cnn-digits",
            "model": {"name": "cnn", "args": {"dropout": 0.0, "channels": channels}},
            "data": {"name": "digits", "global_batch_size": 16 if tiny else 64},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        }
    if name == "gpt":
        sizes = (
            {"n_layer": 1, "n_embd": 32, "n_head": 2}
            if tiny
            else {"n_layer": 2, "n_embd": 128, "n_head": 4}
        )
        return {
            **common,
            "name": "bench-gpt-text",
            "model": {"name": "gpt", "args": {**sizes, "dropout": 0.0}},
            "data": {
                "name": "text",
                "path": str(text_path or DEFAULT_TEXT),
                "seq_len": 16 if tiny else 64,
                "global_batch_size": 8 if tiny else 16,
            },
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        }
    raise ValueError(f"unknown workload {name!r}; choose from cnn, gpt")


@dataclass
class Settings:
    """What each rank runs; plain data so it pickles into the spawned ranks."""

    workloads: dict[str, dict[str, Any]]
    steps: int = 20
    repeats: int = 10
    warmup: int = 5
    run_root: str = "."
    keep_params: bool = False


@dataclass
class SideRecord:
    """One side's measurements on one rank."""

    block_medians: list[float] = field(default_factory=list)
    #: Median process CPU seconds per step (all threads) per block: blind to descheduling.
    block_cpu_medians: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    splits: list[tuple[float, float, float, float]] = field(default_factory=list)


def _torch_optimizer(cfg: Config, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    trainable = [p for p in params if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(
            trainable,
            lr=opt.lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
        )
    if opt.name == "adamw":
        return torch.optim.AdamW(
            trainable, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
    raise ValueError(f"the hand-written loop supports sgd and adamw, not {opt.name!r}")


class HandWrittenDDP:
    """The baseline a user would write: plain DDP, no hook, no scheduler, no timers."""

    def __init__(self, cfg: Config, bundle: DataBundle, sampler: GlobalBatchSampler) -> None:
        torch.manual_seed(cfg.seed)
        self.raw = build_model(cfg.model.name, cfg.model.args, bundle.info.model_defaults())
        self.model = DistributedDataParallel(
            self.raw,
            bucket_cap_mb=cfg.parallel.bucket_cap_mb,
            gradient_as_bucket_view=cfg.parallel.gradient_as_bucket_view,
        )
        self.optimizer = _torch_optimizer(cfg, self.raw.parameters())
        self.dataset = bundle.train
        # Same sampler, hence the same index tensors per step as the Trainer's plan.
        self._plan = (
            (epoch, micro[0])
            for epoch in itertools.count()
            for micro in sampler.epoch_batches(epoch)
        )

    def step(self) -> float:
        epoch, idx = next(self._plan)
        x, y = self.dataset.get_batch(idx, epoch)
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())


class DistmlSide:
    """distml's real step: ``Trainer._batches``, then ``Trainer.train_step``, timed as ``fit()``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.timer = PhaseTimer(trainer.ctx.device)
        self._batches = itertools.chain.from_iterable(
            trainer._batches(epoch, 0) for epoch in itertools.count()
        )
        #: Per step: (t_data, t_compute, t_comm, t_step) as fit() computes them.
        self.splits: list[tuple[float, float, float, float]] = []

    def step(self) -> float:
        batches, t_data = next(self._batches)
        self.timer.start()
        loss, t_comm = self.trainer.train_step(batches)
        t_work = self.timer.lap("work")
        self.splits.append((t_data, max(0.0, t_work - t_comm), t_comm, t_data + t_work))
        return loss


def _run_block(step: Callable[[], float], n: int) -> tuple[list[float], list[float], list[float]]:
    """Wall seconds, process CPU seconds and loss of each of ``n`` steps."""
    dist.barrier()  # both ranks start the block together; not timed
    times, cpu, losses = [], [], []
    for _ in range(n):
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    return times, cpu, losses


def _clone(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _max_abs_diff(a: StateDict, b: StateDict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _bench_workload(name: str, cfg_dict: dict[str, Any], s: Settings) -> dict[str, Any]:
    cfg = build_config(
        {**cfg_dict, "logging": {**cfg_dict["logging"], "run_dir": f"{s.run_root}/{name}"}}
    )
    trainer = Trainer(cfg)
    hand = HandWrittenDDP(cfg, trainer.bundle, trainer.sampler)
    init = _clone(trainer.raw_model)
    if _max_abs_diff(init, _clone(hand.raw)) != 0.0:
        raise RuntimeError(f"{name}: distml and the hand-written loop start from different weights")
    distml_side = DistmlSide(trainer)
    steps: dict[str, Callable[[], float]] = {"distml": distml_side.step, "torch": hand.step}
    records = {side: SideRecord() for side in SIDES}

    def block(side: str, n: int, timed: bool) -> None:
        gc.collect()  # a collection inside a timed block would land on one side only
        times, cpu, losses = _run_block(steps[side], n)
        records[side].losses.extend(losses)
        if timed:
            records[side].block_medians.append(median(times))
            records[side].block_cpu_medians.append(median(cpu))

    for side in SIDES:
        block(side, s.warmup, timed=False)
    distml_side.splits.clear()
    for r in range(s.repeats):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            block(side, s.steps, timed=True)
    records["distml"].splits = distml_side.splits

    final = {"distml": _clone(trainer.raw_model), "torch": _clone(hand.raw)}
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "global_batch": cfg.data.global_batch_size,
        "per_rank_batch": trainer.sampler.micro,
        "bucket_cap_mb": cfg.parallel.bucket_cap_mb,
        "gradient_as_bucket_view": cfg.parallel.gradient_as_bucket_view,
        "parameters": sum(p.numel() for p in trainer.raw_model.parameters()),
        "records": {side: records[side].__dict__ for side in SIDES},
        "max_abs_param_diff": _max_abs_diff(final["distml"], final["torch"]),
        "params_changed": {side: _max_abs_diff(init, final[side]) > 0.0 for side in SIDES},
    }
    if s.keep_params:
        out["params"] = {"init": init, **final}
    return out


def _bench_rank(rank: int, world_size: int, s: Settings) -> dict[str, Any]:
    return {name: _bench_workload(name, cfg, s) for name, cfg in s.workloads.items()}


def _paired(rec: dict[str, Any], key: str) -> float:
    """Median over repeats of distml's block / the adjacent torch block (same repeat)."""
    return median([d / t for d, t in zip(rec["distml"][key], rec["torch"][key], strict=True)])


def _summarize(name: str, cfg: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold both ranks' records for one workload into the report entry (timings from rank 0)."""
    r0 = ranks[0]
    rec = r0["records"]
    med = {side: median(rec[side]["block_medians"]) for side in SIDES}
    cpu = {side: median(rec[side]["block_cpu_medians"]) for side in SIDES}
    splits = rec["distml"]["splits"]
    split = {
        key: median([row[i] for row in splits])
        for i, key in enumerate(("t_data_s", "t_compute_s", "t_comm_s", "t_step_s"))
    }
    batch = r0["global_batch"]
    losses = {side: rec[side]["losses"] for side in SIDES}
    ratio = _paired(rec, "block_medians")
    return {
        "config": cfg,
        "global_batch": batch,
        "per_rank_batch": r0["per_rank_batch"],
        "parameters": r0["parameters"],
        "threads_per_rank": r0["threads"],
        "bucket_cap_mb": r0["bucket_cap_mb"],
        "gradient_as_bucket_view": r0["gradient_as_bucket_view"],
        # Raw data: per side, per rank, one median per timed block (in run order).
        "block_medians_s": {
            side: [r["records"][side]["block_medians"] for r in ranks] for side in SIDES
        },
        "block_cpu_medians_s": {
            side: [r["records"][side]["block_cpu_medians"] for r in ranks] for side in SIDES
        },
        "median_step_s": med,
        "samples_per_s": {side: batch / med[side] for side in SIDES},
        "ratio_paired_median": ratio,
        "ratio_of_medians": med["distml"] / med["torch"],
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "median_cpu_step_s": cpu,
        "cpu_ratio_paired_median": _paired(rec, "block_cpu_medians"),
        # fit()'s own timers: t_step = t_data + t_compute + t_comm (medians taken separately).
        "distml_split": {
            **split,
            **{
                f"{key[2:-2]}_share": split[key] / split["t_step_s"]
                for key in ("t_data_s", "t_compute_s", "t_comm_s")
            },
        },
        "training": {
            side: {
                "steps": len(losses[side]),
                "first_loss": losses[side][0],
                "last_loss": losses[side][-1],
                "loss_finite": all(math.isfinite(v) for v in losses[side]),
                "params_changed": all(r["params_changed"][side] for r in ranks),
            }
            for side in SIDES
        },
        "parity": {
            "losses_equal": losses["distml"] == losses["torch"],
            "max_abs_param_diff": max(r["max_abs_param_diff"] for r in ranks),
        },
    }


@dataclass
class BenchResult:
    report: dict[str, Any]
    #: Per workload: rank 0's {"init", "distml", "torch"} state dicts (with keep_params).
    params: dict[str, dict[str, StateDict]]


def run_benchmark(
    workloads: dict[str, dict[str, Any]],
    steps: int = 20,
    repeats: int = 10,
    warmup: int = 5,
    keep_params: bool = False,
    timeout: float = 1800.0,
) -> BenchResult:
    """Run the interleaved comparison on 2 gloo ranks; the JSON-ready report and params."""
    if min(steps, repeats, warmup) < 1:
        raise ValueError("steps, repeats and warmup must all be >= 1")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as root:
        settings = Settings(workloads, steps, repeats, warmup, root, keep_params)
        ranks = run_ranks(_bench_rank, WORLD_SIZE, args=(settings,), timeout=timeout)
    report: dict[str, Any] = {
        "benchmark": "ddp_overhead",
        "command": command_line(),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {
            "world_size": WORLD_SIZE,
            "backend": "gloo",
            "device": "cpu",
            "steps_per_block": steps,
            "repeats": repeats,
            "warmup_steps": warmup,
            "distml_path": "Trainer._batches + Trainer.train_step (fit's timers, no metrics line)",
            "baseline": "hand-written DistributedDataParallel loop (no comm hook, no scheduler)",
        },
        "workloads": {
            name: _summarize(name, cfg, [r[name] for r in ranks]) for name, cfg in workloads.items()
        },
    }
    params = {name: ranks[0][name]["params"] for name in workloads} if keep_params else {}
    return BenchResult(report, params)


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for name, w in report["workloads"].items():
        split = w["distml_split"]
        for side in SIDES:
            first = side == "distml"
            rows.append(
                [
                    f"{name} (G={w['global_batch']})" if first else "",
                    side,
                    f"{w['median_step_s'][side] * 1e3:.2f}",
                    f"{w['samples_per_s'][side]:.0f}",
                    f"{w['ratio_paired_median']:.3f}" if first else "",
                    f"{w['median_cpu_step_s'][side] * 1e3:.2f}",
                    f"{w['cpu_ratio_paired_median']:.3f}" if first else "",
                    "/".join(
                        f"{split[k] * 1e3:.2f}" for k in ("t_data_s", "t_compute_s", "t_comm_s")
                    )
                    if first
                    else "",
                ]
            )
    cols = ["workload", "side", "step ms", "samples/s", "ratio", "cpu ms", "cpu ratio"]
    cols.append("data/compute/comm ms")
    load = report["load_average_after"]
    title = (
        f"DDP overhead: distml vs hand-written torch, 2 gloo ranks, target ratio <= {TARGET_RATIO}"
    )
    caveat = ""
    if report["settings"]["repeats"] < 5:
        caveat = "; too few repeats for a verdict, a smoke run only"
    print_table(f"{title}\n(medians; load average {load}{caveat})", cols, rows)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=20, help="timed steps per block (default 20)")
    p.add_argument("--repeats", type=int, default=10, help="timed blocks per side (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first (default 5)")
    p.add_argument("--workloads", default="cnn,gpt", help="comma-separated: cnn, gpt")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="text corpus of the gpt workload")
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/ddp_overhead[_quick].json)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps x 2 repeats, 2 warmup")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("cnn", "gpt")]
    if unknown or not names:
        print(
            f"error: unknown workload {unknown[0] if unknown else '(none)'}; "
            "use --workloads cnn,gpt",
            file=sys.stderr,
        )
        return 2
    if "gpt" in names and not Path(args.text).is_file():
        print(
            f"error: text corpus {args.text} not found; pass --text PATH or drop gpt",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.steps, args.repeats, args.warmup = 5, 2, 2
    if min(args.steps, args.repeats, args.warmup) < 1:
        print("error: --steps, --repeats and --warmup must be >= 1", file=sys.stderr)
        return 2
    out = (
        Path(args.out)
        if args.out
        else RESULTS_DIR / ("ddp_overhead_quick.json" if args.quick else "ddp_overhead.json")
    )
    result = run_benchmark(
        {n: workload_config(n, args.text) for n in names}, args.steps, args.repeats, args.warmup
    )
    print_report(result.report)
    print(f"wrote {write_json(result.report, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
