"""Weight quantization and 8-bit optimizer state: size, quality and speed (issue 4).

Questions: how much smaller are int8 and int4 weights than fp32 (targets: int8
>= 3.5x, int4 >= 6x), how much does character-level validation loss change
(target <= 2% for int8), what inference throughput does each reach on CPU, and
how much smaller is 8-bit AdamW state than fp32 AdamW state (target >= 3.5x)
and what accuracy does each reach on digits?

The GPT is trained here for a short run on Tiny Shakespeare (one process), then
quantized with distml's own ``quantize_model``; sizes compare safetensors files
of the same weights (fp32 vs quantized), not the training checkpoint, which also
holds optimizer state.

    python benchmarks/quantization.py [--steps 300] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    machine_info,
    median,
    print_table,
    write_json,
)
from distml.config import build_config
from distml.memory import optimizer_state_bytes, quantize_model, save_quantized
from distml.runtime.dist import DistContext
from distml.train.trainer import Trainer, evaluate_model

TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _gpt_trainer(run_dir: str, steps: int) -> Trainer:
    cfg = {
        "seed": 0,
        "model": {"name": "gpt", "args": {"n_layer": 4, "n_head": 4, "n_embd": 256}},
        "data": {
            "name": "text",
            "path": str(TEXT),
            "seq_len": 128,
            "global_batch_size": 16,
            "eval_batch_size": 64,
        },
        "optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
        "schedule": {
            "epochs": 1,
            "max_steps": steps,
            "warmup_steps": 20,
            "decay": "cosine",
            "eval_every_epochs": 0,
        },
        "parallel": {"threads_per_worker": 2},
        "logging": {"run_dir": run_dir, "progress": False},
    }
    return Trainer(build_config(cfg))


def _throughput(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return len(x) / median(times)


def _optimizer_study(epochs: int) -> dict[str, dict[str, float]]:
    out = {}
    for name in ("adamw", "adamw8bit"):
        cfg = {
            "seed": 0,
            "model": {"name": "mlp", "args": {"hidden": [512, 512]}},
            "optimizer": {"name": name, "lr": 0.002},
            "schedule": {"epochs": epochs, "eval_every_epochs": epochs},
            "logging": {"run_dir": tempfile.mkdtemp(), "progress": False},
        }
        trainer = Trainer(build_config(cfg))
        summary = trainer.fit()
        out[name] = {
            "state_bytes": float(optimizer_state_bytes(trainer.optimizer)),
            "test_accuracy": float(summary["test_accuracy"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "quantization.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 30, 2
    torch.set_num_threads(2)
    work = tempfile.mkdtemp()
    trainer = _gpt_trainer(work, args.steps)
    trainer.fit()
    base = trainer.raw_model.eval()
    ctx = DistContext()
    test = trainer.bundle.test
    x, _ = test.get_batch(torch.arange(64), 0)
    fp32_path = Path(work) / "fp32.safetensors"
    state = {k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(fp32_path))  # lm_head is tied to wte: stored once, as distml does
    rows, report = [], {}
    fp32_loss = evaluate_model(base, test, trainer.task, ctx, 64)["loss"]
    for label in ("fp32", "int8", "int4"):
        if label == "fp32":
            model, path = base, fp32_path
        else:
            bits = 8 if label == "int8" else 4
            import copy

            model = quantize_model(copy.deepcopy(base), bits, group_size=128)
            path = Path(work) / f"{label}.safetensors"
            save_quantized(model, path)
        loss = evaluate_model(model, test, trainer.task, ctx, 64)["loss"]
        report[label] = {
            "bytes": path.stat().st_size,
            "size_ratio": fp32_path.stat().st_size / path.stat().st_size,
            "val_loss": loss,
            "val_loss_change": (loss - fp32_loss) / fp32_loss,
            "samples_per_s": _throughput(model, x, args.repeats),
        }
        r = report[label]
        rows.append(
            [
                label,
                f"{r['bytes']:,}",
                f"{r['size_ratio']:.2f}x",
                f"{loss:.4f}",
                f"{100 * r['val_loss_change']:+.2f}%",
                f"{r['samples_per_s']:.1f}",
            ]
        )
    print_table(
        f"GPT 4x256 after {args.steps} steps on Tiny Shakespeare: weights",
        ["weights", "file bytes", "smaller by", "val loss", "change", "samples/s (seq 128)"],
        rows,
    )
    optim = _optimizer_study(2 if args.quick else 6)
    ratio = optim["adamw"]["state_bytes"] / optim["adamw8bit"]["state_bytes"]
    print_table(
        f"optimizer state on digits MLP 64-512-512-10 (8-bit state {ratio:.2f}x smaller)",
        ["optimizer", "state bytes", "test accuracy"],
        [[k, f"{v['state_bytes']:,.0f}", f"{v['test_accuracy']:.4f}"] for k, v in optim.items()],
    )
    path = write_json(
        {
            "benchmark": "quantization",
            "command": command_line(),
            "machine": machine_info(),
            "steps": args.steps,
            "weights": report,
            "optimizer": optim,
            "optimizer_state_ratio": ratio,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
