"""Federated simulation: distml's vmapped simulator vs a plain sequential PyTorch FedAvg loop.

Question (issue 6): 100 clients with a Dirichlet(0.5) split of the digits
training set, MLP 64-64-10, FedAvg, 10 clients per round, 30 rounds, client
SGD lr 0.1, 1 local epoch, batch 16. How long does ``distml fl simulate``
take against the same algorithm written as a plain loop over clients, and do
they reach the same accuracy (target: >= 3x faster, within 1 point)? Also:
seconds per round at 1,000 and 10,000 clients, and the per-round overhead of
secure aggregation at 10 and 100 clients per round.

Both sides use the same partition, the same per-round client samples and the
same initial model; each side's time covers the whole run (local training,
aggregation and one test evaluation per round). One intra-op thread.

    python benchmarks/fl_simulation.py [--rounds 30] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json
from distml.config import build_config
from distml.data import build_datasets
from distml.federated.api import client_partitions, run_simulation


def _config(clients: int, rounds: int, per_round: int, secagg: int = 0) -> dict:
    return {
        "seed": 0,
        "model": {"name": "mlp", "args": {"hidden": [64]}},
        "data": {"name": "digits"},
        "federated": {
            "strategy": "fedavg",
            "clients": clients,
            "clients_per_round": per_round,
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": 16,
            "lr": 0.1,
            "partition": "dirichlet",
            "alpha": 0.5,
            "secagg_threshold": secagg,
        },
    }


def plain_fedavg(cfg_dict: dict, sampled: list[list[int]]) -> tuple[float, float]:
    """FedAvg as a plain PyTorch loop over clients; returns (seconds, final accuracy)."""
    cfg = build_config(cfg_dict)
    bundle = build_datasets(cfg.data, cfg.seed)
    x, y = bundle.train.inputs.flatten(1), bundle.train.targets
    xt, yt = bundle.test.inputs.flatten(1), bundle.test.targets
    parts = client_partitions(cfg, y)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    fed = cfg.federated
    start = time.perf_counter()
    accuracy = 0.0
    for clients in sampled:
        states, weights = [], []
        for c in clients:
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=fed.lr)
            idx = torch.as_tensor(parts[c])
            for _ in range(fed.local_epochs):
                order = idx[torch.randperm(len(idx))]
                for batch in order.split(fed.batch_size):
                    opt.zero_grad()
                    F.cross_entropy(local(x[batch]), y[batch]).backward()
                    opt.step()
            states.append(local.state_dict())
            weights.append(float(len(idx)))
        total = sum(weights)
        avg = {
            k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total
            for k in states[0]
        }
        model.load_state_dict(avg)
        with torch.no_grad():
            accuracy = float((model(xt).argmax(1) == yt).float().mean())
    return time.perf_counter() - start, accuracy


def distml_run(cfg_dict: dict) -> tuple[float, float, list[list[int]], float]:
    cfg = build_config(cfg_dict)
    history = run_simulation(cfg)
    # The rounds only (local training, aggregation, evaluation), like the plain side's
    # timer, which also starts after the data and partition are ready.
    seconds = sum(r.seconds for r in history.rounds)
    sampled = [list(r.clients) for r in history.rounds]
    per_round = median([r.seconds for r in history.rounds])
    return seconds, float(history.final_accuracy or 0.0), sampled, per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "fl_simulation.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.repeats = 5, 1
    base = _config(100, args.rounds, 10)
    distml_times, plain_times, accs_d, accs_p = [], [], [], []
    for _ in range(args.repeats):
        secs, acc, sampled, _ = distml_run(base)
        distml_times.append(secs)
        accs_d.append(acc)
        secs_p, acc_p = plain_fedavg(base, sampled)
        plain_times.append(secs_p)
        accs_p.append(acc_p)
    speedup = median(plain_times) / median(distml_times)
    rows = [
        ["distml fl simulate (vmap)", f"{median(distml_times):.2f}", f"{median(accs_d):.4f}"],
        ["plain sequential loop", f"{median(plain_times):.2f}", f"{median(accs_p):.4f}"],
    ]
    print_table(
        f"FedAvg, 100 clients, {args.rounds} rounds (speed-up {speedup:.2f}x)",
        ["side", "seconds", "final accuracy"],
        rows,
    )
    scale = {}
    for clients in (1000,) if args.quick else (1000, 10_000):
        # Synthetic data big enough for 20 samples per client, iid split.
        scaled = _config(clients, 3, 10)
        scaled["data"] = {"name": "synthetic-classification", "num_samples": 25 * clients}
        scaled["federated"]["partition"] = "iid"
        _, _, _, per_round = distml_run(scaled)
        scale[clients] = per_round
    secagg = {}
    for per_round_clients in (10, 100):
        threshold = max(2, per_round_clients // 2 + 1)
        plain = distml_run(_config(100, 2, per_round_clients))[3]
        masked = distml_run(_config(100, 2, per_round_clients, secagg=threshold))[3]
        secagg[per_round_clients] = {
            "plain_s": plain,
            "secagg_s": masked,
            "overhead_s": masked - plain,
        }
    print_table(
        "seconds per round",
        ["setting", "seconds"],
        [[f"{c:,} clients, 10 per round", f"{s:.3f}"] for c, s in scale.items()]
        + [
            [f"secure aggregation, {c} per round (overhead)", f"{v['overhead_s']:.3f}"]
            for c, v in secagg.items()
        ],
    )
    path = write_json(
        {
            "benchmark": "fl_simulation",
            "command": command_line(),
            "machine": machine_info(),
            "rounds": args.rounds,
            "distml_s": distml_times,
            "plain_s": plain_times,
            "speedup_median": speedup,
            "accuracy_distml": accs_d,
            "accuracy_plain": accs_p,
            "seconds_per_round_by_clients": scale,
            "secagg": secagg,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
