"""Federated simulation: distml's vmapped simulator vs a plain sequential PyTorch FedAvg loop.

Question (issue 6): 100 clients with a Dirichlet(0.5) split of the digits
training set, MLP 64-64-10, FedAvg, 10 clients per round, 30 rounds, client
SGD lr 0.1, 1 local epoch, batch 16. How long does ``distml fl simulate``
take against the same algorithm written as a plain loop over clients, and do
they reach the same accuracy (target: >= 3x faster, within 1 point)? Also:
seconds per round at 1,000 and 10,000 clients, and the per-round overhead of
secure aggregation at 10 and 100 clients per round, and bytes per round with
and without compression.

Both sides use the same partition, the same per-round client samples and the
same initial model (built by the same code from the same seed); each side's
time covers the whole run (local training, aggregation and one test
evaluation per round). The plain loop shuffles each client's data with its own
generator; a third column replays distml's mini-batch order in the plain loop
to show that the two are the same algorithm (equal to float rounding). At 30
rounds of about one local step per client, accuracy still moves by several
points with the batch order alone, so accuracy is the median over ``--seeds``
seeds (each seed changes partition, init, sampling and batch order). One
intra-op thread.

    python benchmarks/fl_simulation.py [--rounds 30] [--seeds 10] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine_info, median, print_table, write_json
from distml.config import build_config
from distml.data import build_datasets
from distml.federated.api import client_partitions, run_simulation
from distml.federated.parameters import get_parameters, num_bytes
from distml.federated.simulation import round_plans
from distml.federated.transport.wire import DOWNLOAD_CODECS, encode_parameters, make_encoder
from distml.models import get_model_spec, make_model_config


def _config(clients: int, rounds: int, per_round: int, secagg: int = 0, seed: int = 0) -> dict:
    return {
        "seed": seed,
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


def _model(cfg_dict: dict) -> nn.Module:
    """The benchmark's MLP, built exactly as ``distml fl simulate`` builds it (same init)."""
    cfg = build_config(cfg_dict)
    bundle = build_datasets(cfg.data, cfg.seed)
    model_cfg = make_model_config(cfg.model.name, cfg.model.args, bundle.info.model_defaults())
    torch.manual_seed(cfg.seed)
    return get_model_spec(cfg.model.name).build(model_cfg)


def plain_fedavg(
    cfg_dict: dict, sampled: list[list[int]], same_batches: bool = False
) -> tuple[float, float]:
    """FedAvg as a plain PyTorch loop over clients; returns (seconds, final accuracy).

    Same partition, initial model and per-round client samples as distml's run.
    Each client shuffles its own data with its own seeded generator, unless
    ``same_batches``, which replays distml's mini-batch plans (an equivalence check:
    then the two sides must agree to float rounding).
    """
    cfg = build_config(cfg_dict)
    bundle = build_datasets(cfg.data, cfg.seed)
    x, y = bundle.train.inputs, bundle.train.targets
    xt, yt = bundle.test.inputs, bundle.test.targets
    parts = client_partitions(cfg, y)
    model = _model(cfg_dict)
    fed = cfg.federated
    start = time.perf_counter()
    accuracy = 0.0
    for server_round, clients in enumerate(sampled, start=1):
        if same_batches:
            plans = round_plans(
                parts, clients, fed.local_epochs, fed.batch_size, cfg.seed, server_round
            )
            batches = [[torch.from_numpy(r[r >= 0]) for r in p.batches] for p in plans]
        states, weights = [], []
        for k, c in enumerate(clients):
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=fed.lr)
            idx = torch.as_tensor(parts[c])
            if same_batches:
                client_batches = batches[k]
            else:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round * 1009 + c)
                client_batches = [
                    batch
                    for _ in range(fed.local_epochs)
                    for batch in idx[torch.randperm(len(idx), generator=gen)].split(fed.batch_size)
                ]
            for batch in client_batches:
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


def compare(rounds: int, seeds: Sequence[int], repeats: int) -> dict[str, Any]:
    """distml vs the plain loop for every seed; times are medians over ``repeats`` runs."""
    rows = []
    # Warm-up (lazy imports, allocator, first autograd graph) outside every timer.
    warm = _config(100, 2, 10)
    plain_fedavg(warm, distml_run(warm)[2])
    for seed in seeds:
        cfg = _config(100, rounds, 10, seed=seed)
        d_times, p_times = [], []
        for _ in range(repeats):
            secs, acc_d, sampled, _ = distml_run(cfg)
            secs_p, acc_p = plain_fedavg(cfg, sampled)
            d_times.append(secs)
            p_times.append(secs_p)
        _, acc_same = plain_fedavg(cfg, sampled, same_batches=True)
        rows.append(
            {
                "seed": seed,
                "distml_s": median(d_times),
                "plain_s": median(p_times),
                "speedup": median(p_times) / median(d_times),
                "accuracy_distml": acc_d,
                "accuracy_plain": acc_p,
                "accuracy_plain_same_batches": acc_same,
            }
        )
    return {
        "per_seed": rows,
        "speedup_median": median([r["speedup"] for r in rows]),
        "accuracy_distml_median": median([r["accuracy_distml"] for r in rows]),
        "accuracy_plain_median": median([r["accuracy_plain"] for r in rows]),
        "accuracy_distml_mean": float(np.mean([r["accuracy_distml"] for r in rows])),
        "accuracy_plain_mean": float(np.mean([r["accuracy_plain"] for r in rows])),
        "paired_diff_mean": float(
            np.mean([r["accuracy_distml"] - r["accuracy_plain"] for r in rows])
        ),
        "paired_diff_std": float(
            np.std([r["accuracy_distml"] - r["accuracy_plain"] for r in rows], ddof=1)
        )
        if len(rows) > 1
        else 0.0,
        "max_abs_diff_same_batches": max(
            abs(r["accuracy_distml"] - r["accuracy_plain_same_batches"]) for r in rows
        ),
    }


def payload_bytes(rounds_seed: int = 0) -> dict[str, dict[str, int]]:
    """Bytes one round moves for the benchmark model (10 clients) under each codec.

    Real wire payloads: the round-1 client updates of the benchmark run encoded
    by the same safetensors encoders the gRPC client and server use.
    """
    cfg_dict = _config(100, 1, 10, seed=rounds_seed)
    cfg = build_config(cfg_dict)
    bundle = build_datasets(cfg.data, cfg.seed)
    parts = client_partitions(cfg, bundle.train.targets)
    model = _model(cfg_dict)
    params = get_parameters(model)
    history = run_simulation(cfg)
    clients = history.rounds[0].clients
    fed = cfg.federated
    plans = round_plans(parts, clients, fed.local_epochs, fed.batch_size, cfg.seed, 1)
    updates = []
    for plan in plans:
        local = copy.deepcopy(model)
        opt = torch.optim.SGD(local.parameters(), lr=fed.lr)
        for row in plan.batches:
            batch = torch.from_numpy(row[row >= 0])
            opt.zero_grad()
            F.cross_entropy(
                local(bundle.train.inputs[batch]), bundle.train.targets[batch]
            ).backward()
            opt.step()
        updates.append([a - b for a, b in zip(get_parameters(local), params, strict=True)])
    down = {
        c: len(encode_parameters(params, make_encoder(c))) * len(clients) for c in DOWNLOAD_CODECS
    }
    up: dict[str, int] = {}
    for codec, fraction in (
        ("none", 0.0),
        ("fp16", 0.0),
        ("int8", 0.0),
        ("topk", 0.01),
        ("topk", 0.1),
    ):
        name = codec if codec != "topk" else f"topk {fraction:g}"
        encoder = make_encoder(codec, topk_fraction=fraction or 0.01)
        up[name] = sum(len(encode_parameters(u, encoder)) for u in updates)
    dim = sum(p.numel() for p in params) + 3
    up["secure aggregation (masked uint64)"] = 8 * dim * len(clients)
    return {"upload": up, "download": down, "raw_fp32_model_bytes": {"bytes": num_bytes(params)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "fl_simulation.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.seeds, args.repeats = 5, 2, 1
    cmp = compare(args.rounds, range(args.seeds), args.repeats)
    rows = [
        [
            str(r["seed"]),
            f"{r['distml_s']:.2f}",
            f"{r['plain_s']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['accuracy_distml']:.4f}",
            f"{r['accuracy_plain']:.4f}",
            f"{r['accuracy_plain_same_batches']:.4f}",
        ]
        for r in cmp["per_seed"]
    ]
    rows.append(
        [
            "median",
            "",
            "",
            f"{cmp['speedup_median']:.2f}x",
            f"{cmp['accuracy_distml_median']:.4f}",
            f"{cmp['accuracy_plain_median']:.4f}",
            "",
        ]
    )
    print_table(
        f"FedAvg, 100 clients, 10 per round, {args.rounds} rounds",
        ["seed", "distml s", "plain s", "speed-up", "acc distml", "acc plain", "acc plain*"],
        rows,
    )
    print(
        f"mean accuracy over seeds: distml {cmp['accuracy_distml_mean']:.4f}, plain "
        f"{cmp['accuracy_plain_mean']:.4f}; paired difference {100 * cmp['paired_diff_mean']:+.2f}"
        f" points (std {100 * cmp['paired_diff_std']:.2f}); with the same batch order the largest "
        f"difference is {100 * cmp['max_abs_diff_same_batches']:.4f} points"
    )
    print("acc plain*: the plain loop replaying distml's mini-batch order (equivalence check)")
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
    sizes = payload_bytes()
    base_up, base_down = sizes["upload"]["none"], sizes["download"]["none"]
    print_table(
        "bytes per round (10 clients, MLP 64-64-10)",
        ["direction / codec", "bytes", "vs none"],
        [[f"upload {k}", f"{v:,}", f"{v / base_up:.3f}"] for k, v in sizes["upload"].items()]
        + [
            [f"download {k}", f"{v:,}", f"{v / base_down:.3f}"]
            for k, v in sizes["download"].items()
        ],
    )
    path = write_json(
        {
            "benchmark": "fl_simulation",
            "command": command_line(),
            "machine": machine_info(),
            "rounds": args.rounds,
            "comparison": cmp,
            "seconds_per_round_by_clients": scale,
            "secagg": secagg,
            "bytes_per_round": sizes,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
