"""The tiny text-GPT run the Trainer-level model-parallel tests share, and its logged losses.

Each test compares a plan's per-step losses with a single-process run of the
same config; only the plan and a few settings differ between tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT = "to be, or not to be: that is the question. whether tis nobler in the mind " * 24


def tiny_text_cfg(
    run_dir: Path,
    text: Path,
    parallel: dict[str, Any] | None = None,
    *,
    steps: int = 5,
    model: str = "gpt",
    precision: str = "fp32",
    recompute: str = "none",
    **model_args: Any,
) -> dict[str, Any]:
    """A config dict: SGD with momentum and clipping on ``text``, checkpoints under run_dir."""
    args = {"n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 32, **model_args}
    return {
        "seed": 3,
        "model": {"name": model, "args": args},
        "data": {"name": "text", "path": str(text), "seq_len": 16, "global_batch_size": 8},
        "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
        "schedule": {"epochs": 1, "max_steps": steps, "grad_clip": 0.5, "precision": precision},
        "memory": {"recompute": recompute, "every_k": 2},
        "parallel": parallel or {},
        "checkpoint": {"dir": str(run_dir / "ckpt")},
        "logging": {"run_dir": str(run_dir), "progress": False},
    }


def metric_losses(run_dir: Path) -> list[float]:
    """Per-step training losses from the run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "event" not in r]
