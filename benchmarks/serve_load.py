"""Serving load test: batch-1 vs dynamic batching vs dynamic batching on 2 replicas.

Trains two small models (cnn on digits, a small gpt on a text corpus) for a
few steps, starts one ``distml serve`` process per configuration on
loopback, and drives each with :mod:`distml.serve.loadgen` (closed-loop async
clients) at several concurrency levels: ``/v1/predict`` with one digit per
request for the cnn, ``/v1/generate`` (16 greedy tokens) for the gpt. All
servers stay up together and the configurations take turns level by level
and repeat by repeat, so machine noise hits all of them alike; the table and
JSON give medians over repeats of throughput and p50/p99 latency, the mean
batch the server formed (from its /metrics), and the ratio to batch-1.
Writes ``benchmarks/results/serve_load.json`` and ``serve_load.png``.

    python benchmarks/serve_load.py            # full: levels 1,4,16,64, 3 repeats
    python benchmarks/serve_load.py --quick    # one repeat, shorter levels
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine_info, print_table, write_json
from distml.serve.loadgen import LoadResult, run_load_sync
from distml.testing import free_port

CORPUS = "the quick brown fox jumps over the lazy dog. " * 200
CONFIGS = {
    "batch-1": {"replicas": 1, "max_batch_size": 1, "max_delay_ms": 0.0},
    "dynamic": {"replicas": 1, "max_batch_size": 32, "max_delay_ms": 5.0},
    "dynamic x2 replicas": {"replicas": 2, "max_batch_size": 32, "max_delay_ms": 5.0},
}


def train_models(root: Path) -> dict[str, Path]:
    """Checkpoints of a digits cnn and a small gpt (a few real Trainer steps each)."""
    import torch

    from distml.config import build_config
    from distml.train.trainer import Trainer

    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    specs = {
        "cnn": {"model": {"name": "cnn"}},
        "gpt": {
            "model": {"name": "gpt", "args": {"n_layer": 4, "n_head": 4, "n_embd": 128}},
            "data": {
                "name": "text",
                "path": str(root / "corpus.txt"),
                "seq_len": 64,
                "global_batch_size": 16,
            },
        },
    }
    out = {}
    for name, cfg in specs.items():
        base = {
            "schedule": {"epochs": 1, "max_steps": 20},
            "parallel": {"nproc": 1, "device": "cpu", "threads_per_worker": 1},
            "logging": {"run_dir": str(root / name), "progress": False},
            "checkpoint": {"dir": str(root / name / "ckpt")},
        }
        threads = torch.get_num_threads()
        try:
            out[name] = Path(Trainer(build_config({**base, **cfg})).fit()["checkpoint"])
        finally:
            torch.set_num_threads(threads)
    return out


class Server:
    """``distml serve`` in its own session; stop() interrupts it and reaps its replicas."""

    def __init__(self, model: Path, settings: dict[str, Any], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "distml", "serve", str(model), "--port", str(self.port)]
        argv += ["--replicas", str(settings["replicas"])]
        argv += ["--max-batch-size", str(settings["max_batch_size"])]
        argv += ["--max-delay-ms", str(settings["max_delay_ms"])]
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError("server did not become ready")

    def batch_totals(self, generate: bool) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram."""
        name = "distml_serve_generate_batch_size" if generate else "distml_serve_batch_size"
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = []
        for suffix in ("_sum", "_count"):
            match = re.search(rf"^{name}{suffix} (\S+)$", text, re.MULTILINE)
            values.append(float(match.group(1)) if match else 0.0)
        return values[0], values[1]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)  # drains in-flight requests, then stops its replicas
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any replica left in the session
        self.proc.wait(10)
        self._log.close()


def requests_for(model: str) -> Any:
    if model == "cnn":
        from sklearn.datasets import load_digits

        x, _ = load_digits(return_X_y=True)
        rows = (x / 16.0).reshape(-1, 1, 8, 8).tolist()
        return lambda i: ("/v1/predict", {"inputs": [rows[i % len(rows)]]})
    prompts = ["the quick ", "lazy dog", "brown fox jumps ", "over the", "quick brown fox "]
    return lambda i: (
        "/v1/generate",
        {"prompt": prompts[i % len(prompts)], "max_new_tokens": 16, "temperature": 0.0},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(v) for v in args.levels.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        print("training the models ...", flush=True)
        models = train_models(root)
        # The clients run in this process, next to the trained models and torch: frozen,
        # those objects stay out of the clients' full collections (pauses in every p99).
        gc.collect()
        gc.freeze()
        for model in args.models.split(","):
            servers = {
                name: Server(models[model], cfg, root / f"{model}-{i}.log")
                for i, (name, cfg) in enumerate(CONFIGS.items())
            }
            try:
                for server in servers.values():
                    server.wait_ready()
                make = requests_for(model)
                for server in servers.values():  # warm-up: first batches pay one-off costs
                    run_load_sync(server.url, make, 4, 20, 30.0)
                duration = args.duration * (2.0 if model == "gpt" else 1.0)
                for repeat in range(args.repeats):
                    for level in levels:
                        for name, server in servers.items():
                            generate = model == "gpt"
                            before = server.batch_totals(generate)
                            res: LoadResult = run_load_sync(
                                server.url, make, level, args.max_requests, duration
                            )
                            after = server.batch_totals(generate)
                            batches = after[1] - before[1]
                            mean_batch = (after[0] - before[0]) / batches if batches else 0.0
                            row = {"model": model, "config": name, "repeat": repeat}
                            row.update(res.as_dict())
                            row["mean_batch"] = mean_batch
                            results.append(row)
                            print(
                                f"{model:4s} {name:20s} c={level:3d} rep={repeat} "
                                f"{res.throughput_rps:8.1f} req/s p50 {res.p50_ms:7.1f} ms "
                                f"p99 {res.p99_ms:7.1f} ms batch {mean_batch:5.1f} "
                                f"{res.statuses}",
                                flush=True,
                            )
            finally:
                for server in servers.values():
                    server.stop()
    return {"levels": levels, "raw": results, "summary": summarise(results)}


def summarise(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["model"], r["config"], r["concurrency"]) for r in raw})
    out = []
    for model, config, level in keys:
        runs = [
            r for r in raw if (r["model"], r["config"], r["concurrency"]) == (model, config, level)
        ]
        out.append(
            {
                "model": model,
                "config": config,
                "concurrency": level,
                "repeats": len(runs),
                "throughput_rps": statistics.median(r["throughput_rps"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "mean_batch": statistics.median(r["mean_batch"] for r in runs),
                "failed": sum(r["requests"] - r["ok"] for r in runs),
            }
        )
    for row in out:
        base = next(
            r
            for r in out
            if (r["model"], r["config"], r["concurrency"])
            == (row["model"], "batch-1", row["concurrency"])
        )
        row["throughput_vs_batch1"] = row["throughput_rps"] / base["throughput_rps"]
        row["p99_vs_batch1"] = row["p99_ms"] / base["p99_ms"]
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for config in CONFIGS:
            rows = [r for r in summary if r["model"] == model and r["config"] == config]
            rows.sort(key=lambda r: r["concurrency"])
            xs = [r["p99_ms"] for r in rows]
            ys = [r["throughput_rps"] for r in rows]
            ax.plot(xs, ys, marker="o", label=config)
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(
                    f"c={r['concurrency']}",
                    (x, y),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlabel("p99 latency (ms, log)")
        ax.set_ylabel("throughput (requests/s)")
        what = "cnn/digits, /v1/predict" if model == "cnn" else "gpt, /v1/generate 16 tokens"
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 4 s levels")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per level (cnn)")
    parser.add_argument(
        "--max-requests", type=int, default=100_000, help="request cap per level (duration rules)"
    )
    parser.add_argument("--models", default="cnn,gpt")
    parser.add_argument("--out", default=str(RESULTS_DIR / "serve_load.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 4.0
    # SIGTERM unwinds like Ctrl-C, so the servers' `finally` blocks stop them.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = {"benchmark": "serve_load", "command": command_line(), "machine": machine_info()}
    report["settings"] = {"configs": CONFIGS, **vars(args)}
    report.update(run(args))
    out = write_json(report, args.out)
    png = Path(args.out).with_suffix(".png")
    plot(report["summary"], png)
    print_table(
        "serving load test (medians over repeats)",
        [
            "model / config",
            "conc.",
            "req/s",
            "x batch-1",
            "p50 ms",
            "p99 ms",
            "p99 / b-1",
            "mean batch",
        ],
        [
            [
                f"{r['model']} / {r['config']}",
                str(r["concurrency"]),
                f"{r['throughput_rps']:.1f}",
                f"{r['throughput_vs_batch1']:.2f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['p99_vs_batch1']:.2f}",
                f"{r['mean_batch']:.1f}",
            ]
            for r in report["summary"]
        ],
    )
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
