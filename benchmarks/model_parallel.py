"""Model parallelism: per-rank memory at tp=2 / pp=2, and distml's pipeline step vs raw torch.

Questions (issue 5):

* memory: per-rank parameter + AdamW state bytes after one step under
  tp=2 and pp=2 (distml's MeshStrategy, the trainer's code path) relative to one
  process holding everything; target <= 0.55x.
* overhead: the time of distml's pipelined forward+backward step
  (``MeshStrategy.forward_backward``: micro-batching, tied-gradient sum, loss
  broadcast, stage timers, dp all-reduce hook) vs a minimal hand-written
  ``torch.distributed.pipelining`` loop on the same model, schedule and batch;
  both run alternately in one job, medians over repeats; target <= 1.05x.

    python benchmarks/model_parallel.py [--quick] [--out benchmarks/results/model_parallel.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json
from distml.testing import run_ranks

MODEL_ARGS: dict[str, Any] = {
    "vocab_size": 256,
    "block_size": 64,
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "dropout": 0.0,
    "tie_weights": False,
}
MEMORY_TARGET = 0.55
OVERHEAD_TARGET = 1.05


def _bytes(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> tuple[int, int]:
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return weights, state


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, MODEL_ARGS["block_size"])
    x = torch.randint(MODEL_ARGS["vocab_size"], shape, generator=gen)
    return x, torch.randint(MODEL_ARGS["vocab_size"], shape, generator=gen)


def _mesh_strategy(world: int, **parallel: Any) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    from distml.config import ParallelSection
    from distml.models import build_model
    from distml.parallel.mesh_strategy import MeshStrategy
    from distml.runtime.dist import DistContext

    rank = torch.distributed.get_rank()
    ctx = DistContext(rank, world, rank, world)
    strategy = MeshStrategy(ParallelSection(**parallel))
    torch.manual_seed(0)
    model = build_model("gpt", MODEL_ARGS)
    strategy.data_partition(ctx)
    local = strategy.prepare(model, ctx, seed=0)
    return strategy, model, local


def _memory(rank: int, world: int, batch: int) -> dict[str, Any]:
    from distml.models import build_model

    torch.set_num_threads(1)
    x, y = _batch(batch)
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    whole = build_model("gpt", MODEL_ARGS)
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    logits = whole(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    opt.step()
    out["single"] = _bytes(list(whole.parameters()), opt)
    for name, plan in (("tp=2", {"tp": 2}), ("pp=2", {"pp": 2, "pp_microbatches": 4})):
        strategy, _, local = _mesh_strategy(world, **plan)
        opt = torch.optim.AdamW(local.parameters(), lr=1e-3)
        strategy.forward_backward(local, [(x, y)], "lm")
        opt.step()
        params = [p for p in local.parameters() if not p.is_meta]
        out[name] = _bytes(params, opt)
    return out


def _manual_pipeline(model: torch.nn.Module, schedule: str, m: int) -> Any:
    """The hand-written baseline: two stage modules, PipelineStage and torch's schedule."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank = dist.get_rank()
    half = len(model.blocks) // 2

    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = model.wte, model.wpe
            self.blocks = nn.ModuleList(model.blocks[:half])

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return x

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(model.blocks[half:])
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = b(x)
            return self.lm_head(self.ln_f(x))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    module = First() if rank == 0 else Last()
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return module, kind(stage, m, loss_fn=loss_fn)


def _overhead(
    rank: int, world: int, batch: int, m: int, schedule: str, repeats: int
) -> dict[str, Any]:
    from distml.models import build_model

    torch.set_num_threads(1)
    x, y = _batch(batch)
    plan = {"pp": 2, "pp_schedule": schedule, "pp_microbatches": m}
    strategy, _, local = _mesh_strategy(world, **plan)
    torch.manual_seed(0)
    raw_module, raw = _manual_pipeline(build_model("gpt", MODEL_ARGS), schedule, m)

    def distml_step() -> None:
        strategy.forward_backward(local, [(x, y)], "lm")
        local.zero_grad(set_to_none=True)

    def raw_step() -> None:
        if rank == 0:
            raw.step(x)
        else:
            raw.step(target=y, losses=[])
        raw_module.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"distml": [], "torch": []}
    for i in range(repeats + 2):
        # Alternate which goes first, so drift on a shared machine hits both alike.
        order = [("distml", distml_step), ("torch", raw_step)]
        for name, fn in order if i % 2 else order[::-1]:
            torch.distributed.barrier()
            start = time.perf_counter()
            fn()
            torch.distributed.barrier()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1f1b only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "model_parallel.json"))
    args = parser.parse_args(argv)
    schedules = ["1f1b"] if args.quick else ["gpipe", "1f1b"]
    if args.quick:
        args.repeats = 3
    start = time.perf_counter()
    memory = run_ranks(_memory, 2, args=(args.batch,), timeout=300)
    single = sum(memory[0]["single"])
    mem_rows, mem_records = [], []
    for plan in ("tp=2", "pp=2"):
        per_rank = [sum(r[plan]) for r in memory]
        ratio = max(per_rank) / single
        mem_records.append(
            {
                "plan": plan,
                "bytes_per_rank": per_rank,
                "weights_optimizer_per_rank": [r[plan] for r in memory],
                "single_bytes": single,
                "max_ratio": ratio,
                "within_target": ratio <= MEMORY_TARGET,
            }
        )
        mem_rows.append(
            [plan, f"{single / 2**20:.2f}", *(f"{b / 2**20:.2f}" for b in per_rank), f"{ratio:.3f}"]
        )
    print_table(
        "Per-rank parameter + AdamW state memory (MiB), gpt 4x128, vocab 256, untied",
        ["plan", "single", "rank 0", "rank 1", "max ratio"],
        mem_rows,
    )
    over_rows, over_records = [], []
    for schedule in schedules:
        times = run_ranks(
            _overhead,
            2,
            args=(args.batch, args.microbatches, schedule, args.repeats),
            timeout=600,
        )
        ours = median(times[0]["distml"])
        theirs = median(times[0]["torch"])
        ratio = ours / theirs
        over_records.append(
            {
                "schedule": schedule,
                "distml_median_s": ours,
                "torch_median_s": theirs,
                "ratio": ratio,
                "within_target": ratio <= OVERHEAD_TARGET,
                "raw": times[0],
            }
        )
        over_rows.append(
            [
                schedule,
                str(args.microbatches),
                f"{ours * 1e3:.1f}",
                f"{theirs * 1e3:.1f}",
                f"{ratio:.3f}",
            ]
        )
    print_table(
        f"Pipelined step, P=2, batch {args.batch}: distml vs hand-written torch.distributed."
        "pipelining (median ms)",
        ["schedule", "M", "distml", "torch", "ratio"],
        over_rows,
    )
    elapsed = time.perf_counter() - start
    report = {
        "benchmark": "model_parallel",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            "model": MODEL_ARGS,
            "batch": args.batch,
            "microbatches": args.microbatches,
            "repeats": args.repeats,
            "threads_per_rank": 1,
            "memory_target": MEMORY_TARGET,
            "overhead_target": OVERHEAD_TARGET,
        },
        "memory": mem_records,
        "overhead": over_records,
        "wall_s": elapsed,
    }
    print(f"wrote {write_json(report, args.out)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
