"""interleaved-1f1b through `distml train`'s Trainer: 2 ranks x 2 virtual stages equal one process.

A 4-block GPT (so each of the 4 virtual stages holds one block) trains 4 steps
with SGD momentum and clipping; per-step losses, the test loss and the
parameters read back from the sharded checkpoint must equal the
single-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mesh_case import TEXT, metric_losses, tiny_text_cfg

from distml.config import build_config
from distml.testing import run_ranks

STEPS = 4


def _cfg(run_dir: Path, text: Path, **parallel: Any) -> dict[str, Any]:
    return tiny_text_cfg(run_dir, text, parallel, steps=STEPS, n_layer=4)


def _fit(rank: int, world: int, run_dir: str, text: str, parallel: dict[str, Any]) -> dict:
    from distml.train.trainer import Trainer

    return Trainer(build_config(_cfg(Path(run_dir), Path(text), **parallel))).fit()


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
        torch.tensor(metric_losses(tmp_path / "il")),
        torch.tensor(metric_losses(tmp_path / "ref")),
        rtol=1e-4,
        atol=0,
    )
    assert len(metric_losses(tmp_path / "ref")) == STEPS
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
    _, model = load_full_model(summary["checkpoint"])
    want = load_checkpoint(ref["checkpoint"])["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
