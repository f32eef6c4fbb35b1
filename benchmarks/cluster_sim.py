"""Trace-driven scheduling: las and gandiva vs fifo on the Philly trace, and simulator speed.

Question (issue 7): on a window of the Philly trace loaded enough to queue,
how much lower is the average JCT under las and gandiva than under fifo, what
utilization does each reach, and how long does the simulator take for 10,000
jobs on 1,000 GPUs? Utilization is reported while jobs wait for GPUs (the only
time a scheduler can change it), as busy GPUs and as useful work, with every
job saturating its GPUs (gpu_util 1.0) and with jobs that keep their GPUs busy
half the time on average (gpu_util 0.5, where packing can help); gandiva is
also run without time-slicing (quantum 1e9 s) to separate its parts.

    python benchmarks/cluster_sim.py [--limit 2000] [--offset 0] [--gpus 256] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    machine_info,
    print_table,
    write_json,
)
from distml.cluster import compare_policies, run_simulation, synthetic_trace
from distml.cluster.simulator import resolve_trace

TRACE = REPO_ROOT.parent / "shared" / "data" / "philly_jobs.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=256)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--speed-jobs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="500 jobs, 2,000-job speed check")
    parser.add_argument("--gpu-utils", default="1.0,0.5", help="mean per-job GPU utilizations")
    parser.add_argument("--out", default=str(RESULTS_DIR / "cluster_sim.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.speed_jobs = 500, 2000
    plot = Path(args.out).with_suffix(".png")
    summaries = compare_policies(
        args.trace,
        ("fifo", "las", "gandiva"),
        args.gpus,
        args.gpus_per_node,
        offset=args.offset,
        limit=args.limit,
        plot_path=plot,
    )
    utilization = _utilization_study(args, [float(u) for u in args.gpu_utils.split(",")])
    fifo = float(summaries["fifo"]["avg_jct"])
    rows = []
    for name, s in summaries.items():
        rows.append(
            [
                name,
                f"{float(s['avg_jct']) / 3600:.1f}",
                f"{float(s['p99_jct']) / 3600:.1f}",
                f"{fifo / float(s['avg_jct']):.2f}x",
                f"{float(s['utilization']):.3f}",
                str(s["preemptions"]),
            ]
        )
    print_table(
        f"Philly jobs {args.offset}..{args.offset + args.limit} on {args.gpus} GPUs",
        ["policy", "avg JCT h", "p99 JCT h", "fifo/policy avg JCT", "utilization", "preemptions"],
        rows,
    )
    speed = {}
    jobs = synthetic_trace(args.speed_jobs, seed=0)
    for policy in ("fifo", "las", "gandiva"):
        t0, c0 = time.perf_counter(), time.process_time()
        run_simulation(jobs, policy, 1000, 8)
        speed[policy] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    print_table(
        f"simulator speed: {args.speed_jobs} synthetic jobs on 1,000 GPUs",
        ["policy", "wall s", "cpu s"],
        [[p, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}"] for p, v in speed.items()],
    )
    path = write_json(
        {
            "benchmark": "cluster_sim",
            "command": command_line(),
            "machine": machine_info(),
            "window": {
                "offset": args.offset,
                "limit": args.limit,
                "gpus": args.gpus,
                "gpus_per_node": args.gpus_per_node,
            },
            "summaries": summaries,
            "utilization": utilization,
            "speed": speed,
            "plot": str(plot),
        },
        args.out,
    )
    print(f"wrote {path} and {plot}")
    return 0


def _utilization_study(args: argparse.Namespace, utils: list[float]) -> list[dict[str, object]]:
    """Contended utilization of fifo, gandiva and gandiva without time-slicing per gpu_util."""
    trace = resolve_trace(args.trace, args.gpus, offset=args.offset, limit=args.limit)
    variants = [
        ("fifo", "fifo", {}),
        ("gandiva", "gandiva", {}),
        ("gandiva, no time-slicing", "gandiva", {"quantum": 1e9}),
    ]
    out: list[dict[str, object]] = []
    rows = []
    for util in utils:
        base = None
        for label, policy, options in variants:
            s = run_simulation(
                trace, policy, args.gpus, args.gpus_per_node, policy_options=options, gpu_util=util
            ).summary()
            useful = float(s["contended_useful_utilization"])
            base = useful if base is None else base
            out.append({"gpu_util": util, "variant": label, "options": options, **s})
            rows.append(
                [
                    f"{util:.1f}",
                    label,
                    f"{float(s['contended_time']) / 3600:.0f}",
                    f"{float(s['contended_utilization']):.3f}",
                    f"{useful:.3f}",
                    f"{useful / base:.3f}x",
                    f"{float(s['avg_jct']) / 3600:.1f}",
                    str(s["packs"]),
                    str(s["preemptions"]),
                ]
            )
    print_table(
        "utilization while jobs wait (contended), by mean per-job GPU utilization",
        ["gpu_util", "policy", "contended h", "busy", "useful", "useful vs fifo", "avg JCT h",
         "packs", "preempt"],
        rows,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
