"""Training on an emulated slow network: compression, hierarchical all-reduce, parameter servers.

Three questions, each one ``--part`` on ``distml.launch.netem.EmulatedCluster``
(network namespaces joined by rate- and delay-limited links; ranks on one
host talk over its loopback, so only inter-host traffic is limited):

* ``compression``: 2 hosts x 1 rank at ``--rate`` (100 Mbit/s). A 5.2M-parameter
  MLP (64-2240-2240-10) trains on digits with DDP for ``--steps`` steps under each
  gradient hook (none, fp16, int8, top-k, PowerSGD; same seed and batches).
  Reported: median time per step (steps after the first two), speed-up over
  uncompressed, test accuracy at the end, the hook's compression ratio.
* ``hierarchical``: 2 hosts x 2 ranks, only the inter-host link limited. Median
  time (max over ranks) of ``dist.all_reduce`` (gloo's built-in) vs distml's
  ``HierarchicalAllReduce`` and flat ring, order rotated each repeat, results
  checked exactly.
* ``ps``: 3 workers on hosts 0-2 and one server on host 3 (1 Gbit/s links by
  default). A worker's forward-backward (MLP 64-256-256-10, batch 64) is padded
  to ``--compute-ms`` (100 ms, an accelerator step) and worker 2's to twice
  that (the straggler). For ``--seconds`` each, samples/s
  of all-reduce DDP, PS sync, PS async and PS ssp (staleness 2 and 8) on the
  same model, batch and network.

    python benchmarks/comm_training.py --part compression|hierarchical|ps
        [--rate 100mbit] [--delay 1ms] [--steps 40] [--seconds 15] [--repeats 3]

Needs root and iproute2; exits 2 with the reason where the machine cannot
emulate a network. Writes ``results/comm_training_<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json

MASTER_PORT = 29500  # each emulated host has its own port space
CODECS = ("none", "fp16", "int8", "topk", "powersgd")
CODEC_OPTIONS: dict[str, dict[str, Any]] = {
    "int8": {"error_feedback": True},
    "topk": {"fraction": 0.01},
    "powersgd": {"rank": 4},
}


# --- shared worker helpers ---------------------------------------------------------


def _init(rank: int, world: int, master: str) -> None:
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


def _digits() -> tuple[Any, Any, Any, Any]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x = torch.tensor(bunch.data[order], dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target[order], dtype=torch.long)
    cut = int(0.8 * len(y))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-3
    x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _mlp(hidden: Sequence[int], seed: int = 0) -> Any:
    import torch

    from distml.models.mlp import MLP, MLPConfig

    torch.manual_seed(seed)
    return MLP(MLPConfig(in_features=64, hidden=list(hidden), num_classes=10))


# --- part 1: compression hooks ------------------------------------------------------


def compression_worker(rank: int, world: int, master: str, opts: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distml.comm.compression import make_compression_hook

    _init(rank, world, master)
    xtr, ytr, xte, yte = _digits()
    mine = torch.arange(rank, len(ytr), world)
    batch = opts["batch"]
    report: dict[str, Any] = {}
    for name in opts["codecs"]:
        model = DDP(_mlp(opts["hidden"]))
        state = None
        if name != "none":
            state, hook = make_compression_hook(name, None, **CODEC_OPTIONS.get(name, {}))
            model.register_comm_hook(state, hook)
        optim = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        times = []
        for _ in range(opts["steps"]):
            idx = mine[torch.randint(len(mine), (batch,), generator=gen)]
            dist.barrier()
            start = time.perf_counter()
            optim.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            optim.step()
            times.append(time.perf_counter() - start)
        step_times = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(step_times, op=dist.ReduceOp.MAX)
        with torch.no_grad():
            accuracy = (model.module(xte).argmax(1) == yte).float().mean().item()
        report[name] = {
            "step_times_s": step_times.tolist(),
            "accuracy": accuracy,
            "compression_ratio": state.compression_ratio if state is not None else 1.0,
            "params": sum(p.numel() for p in model.parameters()),
        }
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


# --- part 2: hierarchical all-reduce ------------------------------------------------


def hierarchical_worker(rank: int, world: int, master: str, opts: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from distml.comm import HierarchicalAllReduce, host_groups_from_env, ring_all_reduce

    _init(rank, world, master)
    hier = HierarchicalAllReduce(host_groups_from_env(world, opts["per_host"]))
    algorithms: dict[str, Callable[[Any], Any]] = {
        "torch": dist.all_reduce,
        "hierarchical": hier,
        "ring": ring_all_reduce,
    }
    names = list(algorithms)
    for fn in algorithms.values():
        fn(torch.ones(1 << 12))  # open every connection before timing
    sizes, repeats = opts["sizes_mb"], opts["repeats"]
    times = torch.zeros(len(sizes), len(names), repeats, dtype=torch.float64)
    correct = torch.ones(len(sizes), len(names))
    expected = world * (world + 1) / 2
    for s, size_mb in enumerate(sizes):
        tensor = torch.empty(int(size_mb * 2**20) // 4)
        for r in range(repeats):
            for k in range(len(names)):
                a = (k + r) % len(names)
                tensor.fill_(rank + 1)
                dist.barrier()
                start = time.perf_counter()
                algorithms[names[a]](tensor)
                times[s, a, r] = time.perf_counter() - start
                correct[s, a] *= float(bool((tensor == expected).all()))
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(correct, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(
            json.dumps(
                {"algorithms": names, "times_s": times.tolist(), "correct": correct.tolist()}
            )
        )
    hier.close()
    dist.destroy_process_group()


# --- part 3: parameter servers vs all-reduce with a straggler ----------------------------


def _train_step(model: Any, x: Any, y: Any, compute_s: float, slow: bool) -> None:
    """Forward and backward, padded to ``compute_s`` (an accelerator's step time); 2x if slow.

    Padding with sleep keeps the straggler exactly 2x slower whatever the other
    processes on this shared CPU do (real compute would slow down and speed up
    with the CPU contention of each mode).
    """
    import torch

    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    target = compute_s * (2 if slow else 1)
    time.sleep(max(0.0, target - (time.perf_counter() - start)))


def ps_worker(rank: int, world: int, master: str, opts: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from distml.parallel.ps import ParameterServer, PSClient, Shard, plan_shards

    _init(rank, world, master)
    workers = world - 1
    server_rank = workers
    worker_group = dist.new_group(list(range(workers)))
    xtr, ytr, _, _ = _digits()
    batch, seconds = opts["batch"], opts["seconds"]
    slow = rank == workers - 1
    out: dict[str, Any] = {}
    # An untimed first round: the first point-to-point exchange between two ranks pays a
    # one-off setup (seconds on a loaded machine) that would otherwise land on one mode.
    for mode in ["warmup", *opts["modes"]]:
        model = _mlp(opts["hidden"])
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(rank)
        compute_s = opts["compute_ms"] / 1e3
        if mode == "allreduce" and rank != server_rank:
            ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=worker_group)
            optim = torch.optim.SGD(ddp.parameters(), lr=0.05)
            flag = torch.zeros(1)
        dist.barrier()
        steps, start = 0, time.perf_counter()
        if mode == "allreduce":
            if rank == server_rank:
                out[mode] = None
                continue
            while True:
                flag.fill_(float(time.perf_counter() - start >= seconds))
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=worker_group)
                if flag.item() > 0:
                    break
                idx = torch.randint(len(ytr), (batch,), generator=gen)
                _train_step(ddp, xtr[idx], ytr[idx], compute_s, slow)
                optim.step()
                steps += 1
        else:
            consistency, _, stale = mode.replace("warmup", "sync").partition("-")
            plan = plan_shards([(f"p{i}", p) for i, p in enumerate(params)], 1)
            if rank == server_rank:
                shard = Shard(
                    plan, 0, params, torch.optim.SGD(params, lr=0.05), torch.device("cpu")
                )
                server = ParameterServer(
                    plan,
                    0,
                    list(range(workers)),
                    shard,
                    lambda _s: [0.05],
                    consistency=consistency,
                    staleness=int(stale or 0),
                )
                summary = server.serve()
                out[mode] = {"max_gap": summary["ps_max_gap"], "updates": summary["ps_updates"]}
                continue
            client = PSClient(plan, params, [server_rank], seed=rank)
            while steps < 2 if mode == "warmup" else time.perf_counter() - start < seconds:
                idx = torch.randint(len(ytr), (batch,), generator=gen)
                _train_step(model, xtr[idx], ytr[idx], compute_s, slow)
                client.push_pull()
                steps += 1
            client.close()
        out[mode] = {"steps": steps, "elapsed_s": time.perf_counter() - start}
    print(json.dumps({"rank": rank, "results": out}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


WORKERS: dict[str, Callable[[int, int, str, dict[str, Any]], None]] = {
    "compression": compression_worker,
    "hierarchical": hierarchical_worker,
    "ps": ps_worker,
}


# --- the driver ------------------------------------------------------------------------


def run_on_cluster(
    part: str,
    hosts: int,
    per_host: int,
    opts: dict[str, Any],
    rate: str,
    delay: str,
    timeout: float,
) -> tuple[list[str], dict[str, Any]]:
    """Start ``hosts * per_host`` ranks of ``part`` (rank r on host r // per_host); stdouts."""
    from distml.launch.netem import EmulatedCluster

    script = str(Path(__file__).resolve())
    world = hosts * per_host
    with (
        EmulatedCluster(hosts, rate=rate, delay=delay) as cluster,
        tempfile.TemporaryDirectory() as tmp,
    ):
        master = cluster.master(MASTER_PORT)
        procs, logs = [], []
        for rank in range(world):
            out = open(os.path.join(tmp, f"{rank}.out"), "w+b")  # noqa: SIM115
            err = open(os.path.join(tmp, f"{rank}.err"), "w+b")  # noqa: SIM115
            logs.append((out, err))
            argv = [
                sys.executable,
                script,
                "--worker",
                f"{part},{rank},{world},{master}",
                "--opts",
                json.dumps(opts),
            ]
            procs.append(cluster.popen(rank // per_host, argv, stdout=out, stderr=err))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
        codes = [p.poll() for p in procs]
        texts = []
        for out, err in logs:
            out.seek(0)
            err.seek(0)
            texts.append((out.read().decode(errors="replace"), err.read().decode(errors="replace")))
            out.close()
            err.close()
        link = {"engine": cluster.engine, "rate_bps": cluster.rate_bps, "delay_s": cluster.delay_s}
    if any(c != 0 for c in codes):
        bad = next(i for i, c in enumerate(codes) if c != 0)
        tail = " | ".join(texts[bad][1].strip().splitlines()[-4:])
        raise RuntimeError(f"rank {bad} ended with {codes[bad]} (None: timed out): {tail}")
    return [t[0] for t in texts], link


def _last_json(text: str) -> Any:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_part(part: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if part == "compression":
        opts = {
            "codecs": list(CODECS),
            "steps": args.steps,
            "batch": 64,
            "lr": 0.02,
            "hidden": [2240, 2240],
        }
        outs, link = run_on_cluster(part, 2, 1, opts, args.rate, args.delay, 3000)
        raw = _last_json(outs[0])
        base = median(raw["none"]["step_times_s"][2:])
        rows = []
        for name in CODECS:
            t = median(raw[name]["step_times_s"][2:])
            rows.append(
                {
                    "codec": name,
                    "options": CODEC_OPTIONS.get(name, {}),
                    "median_step_s": t,
                    "speedup": base / t,
                    **raw[name],
                }
            )
    elif part == "hierarchical":
        opts = {"per_host": 2, "sizes_mb": [4.0, 16.0], "repeats": args.repeats}
        outs, link = run_on_cluster(part, 2, 2, opts, args.rate, args.delay, 1800)
        raw = _last_json(outs[0])
        rows = []
        for s, size in enumerate(opts["sizes_mb"]):
            meds = {n: median(raw["times_s"][s][a]) for a, n in enumerate(raw["algorithms"])}
            for a, name in enumerate(raw["algorithms"]):
                rows.append(
                    {
                        "size_mb": size,
                        "algorithm": name,
                        "times_s": raw["times_s"][s][a],
                        "median_s": meds[name],
                        "speedup_vs_torch": meds["torch"] / meds[name],
                        "correct": bool(raw["correct"][s][a]),
                    }
                )
    else:
        opts = {
            "modes": args.modes.split(","),
            "batch": 64,
            "compute_ms": args.compute_ms,
            "seconds": args.seconds,
            "hidden": [256, 256],
        }
        outs, link = run_on_cluster(part, 4, 1, opts, args.rate, args.delay, 1800)
        per_rank = [_last_json(o)["results"] for o in outs]
        rows = []
        for mode in opts["modes"]:
            workers = [r[mode] for r in per_rank[:3]]
            steps = sum(w["steps"] for w in workers)
            elapsed = max(w["elapsed_s"] for w in workers)
            rows.append(
                {
                    "mode": mode,
                    "worker_steps": [w["steps"] for w in workers],
                    "samples_per_s": steps * opts["batch"] / elapsed,
                    "server": per_rank[3][mode],
                }
            )
        sync = next(r["samples_per_s"] for r in rows if r["mode"] == "sync")
        for row in rows:
            row["vs_ps_sync"] = row["samples_per_s"] / sync
    return {
        "benchmark": f"comm_training_{part}",
        "command": command_line(),
        "machine": machine_info(),
        "link": link,
        "settings": opts,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def print_report(part: str, report: dict[str, Any]) -> None:
    link = report["link"]
    rate = f"{link['rate_bps'] / 1e6:g} Mbit/s" if link["rate_bps"] else "unlimited"
    title = f"{part} on emulated hosts ({link['engine']}): {rate}, {link['delay_s'] * 1e3:g} ms"
    rows = report["rows"]
    if part == "compression":
        cols = ["codec", "step ms", "speed-up", "test acc %", "ratio"]
        cells = [
            [
                r["codec"],
                f"{r['median_step_s'] * 1e3:.0f}",
                f"{r['speedup']:.2f}",
                f"{r['accuracy'] * 100:.1f}",
                f"{r['compression_ratio']:.1f}",
            ]
            for r in rows
        ]
    elif part == "hierarchical":
        cols = ["size MiB", "algorithm", "median ms", "x faster than torch", "correct"]
        cells = [
            [
                f"{r['size_mb']:g}",
                r["algorithm"],
                f"{r['median_s'] * 1e3:.0f}",
                f"{r['speedup_vs_torch']:.2f}",
                str(r["correct"]),
            ]
            for r in rows
        ]
    else:
        cols = ["mode", "samples/s", "vs ps sync", "worker steps"]
        cells = [
            [
                r["mode"],
                f"{r['samples_per_s']:.0f}",
                f"{r['vs_ps_sync']:.2f}",
                str(r["worker_steps"]),
            ]
            for r in rows
        ]
    print_table(title, cols, cells)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--part", choices=list(WORKERS), default="compression")
    p.add_argument("--rate", default=None, help="link rate (default 100mbit; ps: 1gbit)")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--steps", type=int, default=40, help="compression: training steps per codec")
    p.add_argument("--seconds", type=float, default=15.0, help="ps: seconds per mode")
    p.add_argument("--compute-ms", type=float, default=100.0, help="ps: a worker's step time")
    p.add_argument(
        "--modes", default="sync,async,ssp-2,ssp-8,allreduce", help="ps: modes in run order"
    )
    p.add_argument("--repeats", type=int, default=3, help="hierarchical: timed calls per size")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        part, rank, world, master = args.worker.split(",", 3)
        WORKERS[part](int(rank), int(world), master, json.loads(args.opts))
        return 0
    if args.rate is None:
        args.rate = "1gbit" if args.part == "ps" else "100mbit"
    from distml.errors import UserError
    from distml.launch.netem import NetworkSetupError

    try:
        report = run_part(args.part, args)
    except (UserError, NetworkSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(args.part, report)
    out = args.out or RESULTS_DIR / f"comm_training_{args.part}.json"
    print(f"wrote {write_json(report, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
