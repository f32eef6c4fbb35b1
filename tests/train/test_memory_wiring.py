"""memory.recompute, optimizer adamw8bit and `distml memory` through the trainer and CLI."""

from __future__ import annotations

import pytest
import torch

from distml.cli.main import main
from distml.config import build_config
from distml.errors import ConfigError
from distml.train.trainer import Trainer


def _gpt_cfg(tmp_path, text, **memory) -> dict:
    return {
        "seed": 2,
        "model": {"name": "gpt", "args": {"n_layer": 3, "n_head": 2, "n_embd": 32}},
        "data": {"name": "text", "path": str(text), "seq_len": 32, "global_batch_size": 8},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "schedule": {"epochs": 1, "max_steps": 3, "eval_every_epochs": 0},
        "memory": memory,
        "logging": {"run_dir": str(tmp_path), "progress": False},
    }


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question. " * 60)
    return path


@pytest.mark.parametrize("memory", [{"recompute": "full"}, {"recompute": "every_k", "every_k": 2},
                                    {"recompute": "selective", "recompute_modules": ["mlp"]}])
def test_recompute_modes_train_identically_to_none(tmp_path, text, memory) -> None:
    ref = Trainer(build_config(_gpt_cfg(tmp_path / "a", text)))
    ref.fit()
    other = Trainer(build_config(_gpt_cfg(tmp_path / "b", text, **memory)))
    assert other.recompute_plan is not None and other.recompute_plan.wrapped
    other.fit()
    a, b = ref.raw_model.state_dict(), other.raw_model.state_dict()
    assert a.keys() == b.keys()  # checkpoints stay compatible
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_impossible_auto_budget_is_one_clear_line(tmp_path, text) -> None:
    with pytest.raises(ConfigError, match=r"^memory.budget_mb=0.001 cannot be met even with full recomputation; the smallest feasible budget is [0-9.]+ MB$"):
        Trainer(build_config(_gpt_cfg(tmp_path, text, recompute="auto", budget_mb=0.001)))


def test_adamw8bit_is_selectable(tmp_path) -> None:
    cfg = {
        "model": {"name": "mlp"},
        "optimizer": {"name": "adamw8bit", "lr": 0.003},
        "schedule": {"epochs": 3},
        "logging": {"run_dir": str(tmp_path), "progress": False},
    }
    summary = Trainer(build_config(cfg)).fit()
    assert summary["test_accuracy"] > 0.9


def test_distml_memory_prints_report_and_advice(tmp_path, text, capsys) -> None:
    code = main(["memory", "model.name=gpt", "data.name=text", f"data.path={text}",
                 "data.seq_len=32", "model.args={n_layer: 2, n_head: 2, n_embd: 32}",
                 "data.global_batch_size=8", "--budget-mb", "1000"])
    assert code == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "measured peak" in out and "recompute full" in out
