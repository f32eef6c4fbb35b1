"""Activation recomputation: activation memory and step time per policy (issue 4).

Question: on distml's GPT (8 layers, d_model 384, sequence 256, batch 16, fp32,
CPU) how much activation memory do the recompute policies save and what does
the recomputation cost? Targets: ``full`` >= 4x lower activation memory at
<= 40% extra step time; ``selective`` >= 2x lower at <= 20% extra.

Activation memory is measured two ways on the same model copy:

* saved-tensor bytes: what autograd keeps between forward and backward,
  counted by ``saved_tensors_hooks`` (``measure_saved_bytes``; parameters and
  the batch excluded; what the ``auto`` budget counts), and
* allocator peak: the CPU allocator's peak above the level at the start of a
  forward+backward whose gradient buffers already exist, from torch.profiler
  memory events (so it also holds the transient recomputation and backward
  temporaries).

Step time (forward+backward, no optimizer) is timed interleaved: every repeat
runs each policy once in turn (alternating the order), so load from other
processes hits all of them alike; the figure is the median over repeats and
the ratio to ``none``. ``--timer cpu`` (the default) reads this process's CPU
time (``time.process_time``) with one intra-op thread, which time spent
descheduled by other processes does not inflate; ``--timer wall`` reads
``perf_counter`` with ``--threads`` threads.

    python benchmarks/recompute.py [--repeats 5] [--timer cpu|wall] [--threads 2]
        [--policies none,full,...] [--no-allocator-peak] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json
from distml.memory import apply_recompute, measure_saved_bytes
from distml.memory.profiler import peak_allocated
from distml.models import get_model_spec, make_model_config

# (label, mode, selective module names)
POLICIES: list[tuple[str, str, tuple[str, ...]]] = [
    ("none", "none", ()),
    ("full", "full", ()),
    ("selective:attn", "selective", ("attn",)),
    ("selective:mlp", "selective", ("mlp",)),
    ("selective:attn+mlp", "selective", ("attn", "mlp")),
    ("auto", "auto", ()),
]


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())


def _build(layers: int, d_model: int, heads: int, seq: int) -> nn.Module:
    args = {"n_layer": layers, "n_embd": d_model, "n_head": heads, "block_size": seq}
    model: nn.Module = get_model_spec("gpt").build(make_model_config("gpt", args))
    return model


def _fwd_bwd(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    def run() -> None:
        _loss(model(x), y).backward()

    return run


def _allocator_peak(model: nn.Module, x: Tensor, y: Tensor) -> int:
    run = _fwd_bwd(model, x, y)
    run()  # creates the gradient buffers, which then stay (zeroed) outside the measurement
    model.zero_grad(set_to_none=False)
    peak, _ = peak_allocated(run, torch.device("cpu"))
    model.zero_grad(set_to_none=False)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (wall timer)")
    ap.add_argument("--timer", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--policies", default=",".join(p[0] for p in POLICIES))
    ap.add_argument("--no-allocator-peak", action="store_true", help="skip the slow profiler pass")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, smoke test only")
    ap.add_argument("--out", default=str(RESULTS_DIR / "recompute.json"))
    a = ap.parse_args()
    if a.quick:
        a.layers, a.d_model, a.heads, a.seq, a.batch, a.repeats = 4, 64, 2, 32, 4, 2
        if a.out == str(RESULTS_DIR / "recompute.json"):
            a.out = str(RESULTS_DIR / "recompute_quick.json")
    if a.timer == "cpu":
        a.threads = 1  # process CPU time equals compute time only without idle worker threads
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.timer == "cpu" else time.perf_counter
    wanted = a.policies.split(",")
    unknown = sorted(set(wanted) - {p[0] for p in POLICIES})
    if unknown or "none" not in wanted:
        ap.error(f"--policies needs none and names from {[p[0] for p in POLICIES]}")
    torch.manual_seed(0)
    base = _build(a.layers, a.d_model, a.heads, a.seq)
    vocab = base.lm_head.out_features  # type: ignore[union-attr]
    x = torch.randint(0, vocab, (a.batch, a.seq))
    y = torch.randint(0, vocab, (a.batch, a.seq))

    def loss_fn(out: Any) -> Tensor:
        return _loss(out, y)

    models: dict[str, nn.Module] = {}
    plans: dict[str, str] = {}
    saved: dict[str, int] = {}
    for label, mode, modules in POLICIES:
        if label not in wanted:
            continue
        model = copy.deepcopy(base)
        budget = saved["none"] / 2 / 1e6 if mode == "auto" else None
        plan = apply_recompute(
            model,
            mode,
            module_types=modules or ("attn", "mlp"),
            budget_mb=budget,
            sample_input=x,
            loss_fn=loss_fn,
        )
        models[label] = model
        plans[label] = plan.summary()
        saved[label] = measure_saved_bytes(model, x, loss_fn)
        print(f"{label}: {plans[label]}", flush=True)
    peaks = {
        label: 0 if a.no_allocator_peak else _allocator_peak(m, x, y) for label, m in models.items()
    }

    times: dict[str, list[float]] = {label: [] for label in models}
    for m in models.values():  # warm-up, unmeasured
        _fwd_bwd(m, x, y)()
        m.zero_grad(set_to_none=False)
    for r in range(a.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for label in order:
            m = models[label]
            run = _fwd_bwd(m, x, y)
            t0 = clock()
            run()
            times[label].append(clock() - t0)
            m.zero_grad(set_to_none=False)
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)

    t_none = median(times["none"])
    rows, results = [], {}
    for label in models:
        t = median(times[label])
        res = {
            "plan": plans[label],
            "saved_bytes": saved[label],
            "allocator_peak_bytes": peaks[label],
            "saved_reduction_x": saved["none"] / saved[label],
            "allocator_reduction_x": peaks["none"] / peaks[label] if peaks[label] else None,
            "step_s_median": t,
            "step_s_all": times[label],
            "extra_time_pct": 100.0 * (t / t_none - 1.0),
        }
        results[label] = res
        rows.append(
            [
                label,
                f"{saved[label] / 1e6:.1f}",
                f"{res['saved_reduction_x']:.2f}x",
                f"{peaks[label] / 1e6:.1f}" if peaks[label] else "-",
                f"{peaks['none'] / peaks[label]:.2f}x" if peaks[label] else "-",
                f"{t:.3f}",
                f"{res['extra_time_pct']:+.1f}%",
            ]
        )
    title = (
        f"Recomputation: gpt {a.layers}x{a.d_model}, seq {a.seq}, batch {a.batch}, fp32 CPU, "
        f"{a.threads} thread(s), {a.timer} time, median of {a.repeats}"
    )
    columns = ["policy", "saved MB", "saved ↓", "alloc peak MB", "peak ↓", "step s", "extra time"]
    columns[5] = f"step s ({a.timer})"
    print_table(title, columns, rows)
    report = {
        "benchmark": "recompute",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            "layers": a.layers,
            "d_model": a.d_model,
            "heads": a.heads,
            "seq": a.seq,
            "batch": a.batch,
            "repeats": a.repeats,
            "threads": a.threads,
            "timer": a.timer,
            "auto_budget_mb": saved["none"] / 2 / 1e6,
        },
        "results": results,
    }
    print(f"wrote {write_json(report, a.out)}")


if __name__ == "__main__":
    main()
