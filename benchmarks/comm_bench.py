"""All-reduce on an emulated multi-host network: link rate vs torch's gloo, distml, the cost model.

Question: on hosts joined by links of known rate and delay, what bandwidth
does an all-reduce of a large message achieve, how do distml's own
collectives compare with torch.distributed's built-in ``all_reduce``, and how
well does distml's alpha-beta model predict the time?

Setup: ``distml.launch.netem.EmulatedCluster`` builds ``--hosts`` network
namespaces whose links to one switch are limited to ``--rate`` in each
direction with ``--delay`` one-way latency (engine ``tc``: veth + bridge +
tbf/netem; ``userspace``: TUN devices and a forwarding process, where the
kernel has no sch_netem). One gloo rank runs on each host (this file with
``--worker``), rendezvous at host 0's address, one intra-op thread.

Measured, per float32 message size: ``dist.all_reduce`` (gloo's built-in) and,
when importable, distml's ``ring``, ``halving_doubling`` and ``tree``
all-reduce. Each call is timed between barriers, the maximum over ranks
kept, the median over ``--repeats`` reported; the order of algorithms rotates
every repeat so load bursts hit all alike, and every result is checked
exactly. Reported: bus bandwidth ``2(p-1)/p * n / t`` (the bytes each rank
must send in a bandwidth-optimal all-reduce, so it can reach the link rate
but not exceed it) as a fraction of the rate, the time relative to the
built-in, and the model: ``measure_alpha_beta`` fits alpha and beta by
ping-pong on the same link, ``predict_all_reduce_time`` predicts each distml
algorithm (the built-in is compared with the ring formula).

    python benchmarks/comm_bench.py [--rate 100mbit] [--delay 1ms] [--hosts 2]
        [--sizes-mb 1,4,16] [--repeats 3] [--engine auto|tc|userspace]
        [--out benchmarks/results/comm_bench.json] [--quick]

Needs root and iproute2 (network namespaces); it exits 2 with the reason where
the machine cannot emulate a network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json

BUILTIN = "torch"
MODEL_OF = {BUILTIN: "ring", "ring": "ring", "halving_doubling": "halving_doubling", "tree": "tree"}
MASTER_PORT = 29500  # every emulated host has its own port space: no clash with other jobs


# --- the worker: one rank on one emulated host ---------------------------------


def _algorithms() -> dict[str, Callable[[Any], Any]]:
    import torch.distributed as dist

    found: dict[str, Callable[[Any], Any]] = {BUILTIN: dist.all_reduce}
    try:
        from distml.comm import collectives
    except ImportError:
        return found
    for name in ("ring", "halving_doubling", "tree"):
        fn = getattr(collectives, f"{name}_all_reduce", None)
        if fn is not None:
            found[name] = fn
    return found


def _fit_link() -> dict[str, float] | None:
    try:
        from distml.comm.cost import measure_alpha_beta
    except ImportError:
        return None
    link = measure_alpha_beta(repeats=5)
    return {"alpha_s": link.alpha, "beta_s_per_byte": link.beta}


def worker(rank: int, world: int, master: str, sizes_mb: Sequence[float], repeats: int) -> None:
    """Time every algorithm on every size; rank 0 prints one JSON line with the results."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    algorithms = _algorithms()
    names = list(algorithms)
    expected = world * (world + 1) / 2
    warm = torch.zeros(1 << 16)
    for fn in algorithms.values():
        fn(warm)  # opens every connection the algorithm uses before timing starts
    link = _fit_link()
    times = torch.zeros(len(sizes_mb), len(names), repeats, dtype=torch.float64)
    correct = torch.ones(len(sizes_mb), len(names))
    for s, size_mb in enumerate(sizes_mb):
        tensor = torch.empty(int(size_mb * 2**20) // 4)
        for r in range(repeats):
            for k in range(len(names)):
                a = (k + r) % len(names)  # rotate the order every repeat
                tensor.fill_(rank + 1)
                dist.barrier()
                start = time.perf_counter()
                algorithms[names[a]](tensor)
                times[s, a, r] = time.perf_counter() - start
                if not bool((tensor == expected).all()):
                    correct[s, a] = 0
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(correct, op=dist.ReduceOp.MIN)
    if rank == 0:
        out = {"algorithms": names, "times_s": times.tolist(), "correct": correct.tolist()}
        print(json.dumps({**out, "link": link}), flush=True)
    dist.destroy_process_group()


# --- the driver --------------------------------------------------------------------


def _rows(
    raw: dict[str, Any], sizes_mb: Sequence[float], world: int, rate_bps: float | None
) -> list[dict[str, Any]]:
    link = raw["link"]
    model = None
    if link is not None:
        from distml.comm.cost import LinkModel, predict_all_reduce_time

        fitted = LinkModel(alpha=link["alpha_s"], beta=link["beta_s_per_byte"])

        def model(name: str, nbytes: float) -> float:
            return predict_all_reduce_time(MODEL_OF[name], nbytes, world, fitted)

    rows = []
    for s, size_mb in enumerate(sizes_mb):
        nbytes = int(size_mb * 2**20) // 4 * 4
        medians = {name: median(raw["times_s"][s][a]) for a, name in enumerate(raw["algorithms"])}
        for a, name in enumerate(raw["algorithms"]):
            t = medians[name]
            bus_bps = 2 * (world - 1) / world * nbytes * 8 / t
            predicted = model(name, nbytes) if model is not None else None
            rows.append(
                {
                    "size_mb": size_mb,
                    "bytes": nbytes,
                    "algorithm": name,
                    "times_s": raw["times_s"][s][a],
                    "median_s": t,
                    "min_s": min(raw["times_s"][s][a]),
                    "bus_bandwidth_bps": bus_bps,
                    "link_utilization": bus_bps / rate_bps if rate_bps else None,
                    "time_vs_builtin": t / medians[BUILTIN],
                    "model": MODEL_OF[name],
                    "predicted_s": predicted,
                    "measured_over_predicted": t / predicted if predicted else None,
                    "correct": bool(raw["correct"][s][a]),
                }
            )
    return rows


def run_comm_bench(
    rate: str = "100mbit",
    delay: str = "1ms",
    hosts: int = 2,
    sizes_mb: Sequence[float] = (1, 4, 16),
    repeats: int = 3,
    engine: str = "auto",
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Build the emulated cluster, run one worker per host, return the report (see module doc)."""
    from distml.launch.netem import EmulatedCluster

    script = str(Path(__file__).resolve())
    sizes = ",".join(str(s) for s in sizes_mb)
    started = time.perf_counter()
    with EmulatedCluster(hosts, rate=rate, delay=delay, engine=engine) as cluster:
        master = cluster.master(MASTER_PORT)

        def command(host: int, _address: str) -> list[str]:
            return [
                sys.executable, script, "--worker", f"{host},{hosts},{master}",
                "--sizes-mb", sizes, "--repeats", str(repeats),
            ]  # fmt: skip

        results = cluster.run_on_all(command, timeout=timeout, fail_fast=True)
        link: dict[str, Any] = {
            "engine": cluster.engine,
            "rate_bps": cluster.rate_bps,
            "delay_s": cluster.delay_s,
        }
    bad = [r for r in results if not r.ok]
    if bad:
        tail = " | ".join(bad[0].stderr.strip().splitlines()[-3:])
        why = "timed out" if bad[0].timed_out else f"exit code {bad[0].returncode}"
        raise RuntimeError(f"worker on host {bad[0].host} failed ({why}): {tail}")
    raw = json.loads(results[0].stdout.strip().splitlines()[-1])
    fit = raw["link"]
    if fit is not None:
        fit["bandwidth_bps"] = 8 / fit["beta_s_per_byte"]
    return {
        "benchmark": "comm_bench",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {"hosts": hosts, "sizes_mb": list(sizes_mb), "repeats": repeats},
        "link": link,
        "alpha_beta_fit": fit,
        "distml_collectives": [a for a in raw["algorithms"] if a != BUILTIN],
        "rows": _rows(raw, sizes_mb, hosts, link["rate_bps"]),
        "wall_s": time.perf_counter() - started,
    }


def print_report(report: dict[str, Any]) -> None:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [
        [
            f"{row['size_mb']:g} MB" if row["algorithm"] == BUILTIN else "",
            row["algorithm"] + ("" if row["correct"] else " (WRONG)"),
            f"{row['median_s'] * 1e3:.1f}",
            f"{row['bus_bandwidth_bps'] / 1e6:.1f}",
            num(row["link_utilization"] and row["link_utilization"] * 100, ".0f"),
            f"{row['time_vs_builtin']:.2f}",
            num(row["predicted_s"] and row["predicted_s"] * 1e3, ".1f"),
            num(row["measured_over_predicted"], ".2f"),
        ]
        for row in report["rows"]
    ]
    link, fit = report["link"], report["alpha_beta_fit"]
    rate = f"{link['rate_bps'] / 1e6:g} Mbit/s" if link["rate_bps"] else "unlimited"
    title = (
        f"all-reduce over {report['settings']['hosts']} emulated hosts ({link['engine']} engine): "
        f"{rate}, {link['delay_s'] * 1e3:g} ms one-way"
    )
    if fit is not None:
        title += (
            f"\nalpha-beta fit: alpha {fit['alpha_s'] * 1e3:.2f} ms, "
            f"1/beta {fit['bandwidth_bps'] / 1e6:.1f} Mbit/s"
        )
    cols = ["size", "algorithm", "median ms", "bus Mbit/s", "% of rate", "x torch", "model ms"]
    print_table(title, [*cols, "meas/model"], rows)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rate", default="100mbit", help="per-host link rate (default 100mbit)")
    p.add_argument("--delay", default="1ms", help="one-way delay between hosts (default 1ms)")
    p.add_argument("--hosts", type=int, default=2, help="emulated hosts, one rank each (2)")
    p.add_argument("--sizes-mb", default="1,4,16", help="message sizes in MiB (default 1,4,16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per size and algorithm")
    p.add_argument("--engine", default="auto", choices=["auto", "tc", "userspace"])
    p.add_argument(
        "--out", default=None, help="JSON path (default results/comm_bench[_quick].json)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 MiB, 2 repeats")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # RANK,WORLD,MASTER
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        sizes = [float(s) for s in args.sizes_mb.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if args.quick:
        sizes, args.repeats = [1.0, 4.0], 2
    if not sizes or min(sizes) <= 0 or args.repeats < 1:
        print(
            "error: --sizes-mb needs positive sizes (e.g. 1,4,16), --repeats >= 1", file=sys.stderr
        )
        return 2
    if args.worker:
        rank, world, master = args.worker.split(",", 2)
        worker(int(rank), int(world), master, sizes, args.repeats)
        return 0
    from distml.errors import UserError
    from distml.launch.netem import NetworkSetupError

    try:
        report = run_comm_bench(args.rate, args.delay, args.hosts, sizes, args.repeats, args.engine)
    except (UserError, NetworkSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or RESULTS_DIR / ("comm_bench_quick.json" if args.quick else "comm_bench.json")
    print_report(report)
    print(f"wrote {write_json(report, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
