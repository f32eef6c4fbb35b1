"""bf16 autocast trains; --profile writes a Chrome trace; prefetching gives the same run."""

from __future__ import annotations

import json

import torch

from distml.config import build_config
from distml.train.trainer import Trainer


def _cfg(run_dir, **extra) -> dict:
    cfg = {
        "model": {"name": "cnn", "args": {"dropout": 0.0}},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"epochs": 3},
        "logging": {"run_dir": str(run_dir), "progress": False},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path) -> None:
    trainer = Trainer(build_config(_cfg(tmp_path, schedule={"precision": "bf16"})))
    summary = trainer.fit()
    assert summary["test_accuracy"] > 0.9
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())


def test_profile_writes_a_chrome_trace(tmp_path) -> None:
    cfg = _cfg(tmp_path, schedule={"epochs": 1, "max_steps": 8}, logging={"profile": True})
    Trainer(build_config(cfg)).fit()
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("conv" in name for name in names)


def test_prefetch_gives_the_same_parameters(tmp_path) -> None:
    base = _cfg(tmp_path / "a", schedule={"epochs": 1, "max_steps": 10})
    pre = _cfg(tmp_path / "b", schedule={"epochs": 1, "max_steps": 10}, data={"prefetch": True})
    a, b = Trainer(build_config(base)), Trainer(build_config(pre))
    a.fit()
    b.fit()
    for key, value in a.raw_model.state_dict().items():
        assert torch.equal(value, b.raw_model.state_dict()[key]), key
