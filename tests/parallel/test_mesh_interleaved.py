"""interleaved-1f1b through `distml train`'s Trainer: 2 ranks x 2 virtual stages equal one process.

A 4-block GPT (so each of the 4 virtual stages holds one block) trains 4 steps
with SGD momentum and clipping; per-step losses, the test loss and the
parameters read back from the sharded checkpoint must equal the
single-process run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distml.config import build_config
from distml.testing import run_ranks

STEPS = 4
TEXT = "to be, or not to be: that is the question. whether tis nobler in the mind " * 24


def _cfg(run_dir: Path, text: Path, **parallel: Any) -> dict[str, Any]:
    return {
        "seed": 3,
        "model": {
            "name": "gpt",
            "args": {"n_layer": 4, "n_head": 2, "n_embd": 16, "vocab_size": 32},
        },
        "data": {"name": "text", "path": str(text), "seq_len": 16, "global_batch_size": 8},
        "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
        "schedule": {"epochs": 1, "max_steps": STEPS, "grad_clip": 0.5},
        "parallel": parallel,
        "checkpoint": {"dir": str(run_dir / "ckpt")},
        "logging": {"run_dir": str(run_dir), "progress": False},
    }


def _fit(rank: int, world: int, run_dir: str, text: str, parallel: dict[str, Any]) -> dict:
    from distml.train.trainer import Trainer

    return Trainer(build_config(_cfg(Path(run_dir), Path(text), **parallel))).fit()


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "event" not in r]


def test_interleaved_1f1b_trains_like_single_process(tmp_path: Path) -> None:
    from distml.parallel.mesh_checkpoint import load_full_model
    from distml.train.checkpoint import load_checkpoint

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    ref = _fit(0, 1, str(tmp_path / "ref"), str(text), {})
    plan = {"pp": 2, "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2}
    [summary, _] = run_ranks(
        _fit, 2, args=(str(tmp_path / "il"), str(text), {**plan, "pp_microbatches": 2}), timeout=180
    )
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "il")),
        torch.tensor(_losses(tmp_path / "ref")),
        rtol=1e-4,
        atol=0,
    )
    assert len(_losses(tmp_path / "ref")) == STEPS
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
    _, model = load_full_model(summary["checkpoint"])
    want = load_checkpoint(ref["checkpoint"])["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
