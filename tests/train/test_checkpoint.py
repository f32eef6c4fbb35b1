"""Checkpoints: bit-exact resume, resume at another world size, atomic writes, corruption."""

from __future__ import annotations

import os

import pytest
import torch

from distml.config import build_config
from distml.errors import CheckpointError
from distml.testing import run_ranks
from distml.train.checkpoint import CheckpointManager, load_checkpoint
from distml.train.trainer import Trainer


def _cfg(run_dir: str, **schedule) -> dict:
    return {
        "seed": 11,
        "model": {"name": "cnn"},  # dropout 0.25: exercises RNG-state restore
        "data": {"name": "digits", "global_batch_size": 128},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"epochs": 2, "warmup_steps": 3, "decay": "cosine", **schedule},
        "checkpoint": {"keep_last": 2},
        "logging": {"run_dir": run_dir, "progress": False},
    }


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    for i, st in trainer.optimizer.state_dict()["state"].items():
        out[f"opt.{i}"] = st["momentum_buffer"].clone()
    return out


def _interrupted_vs_straight(root: str, stop_at: int) -> tuple[dict, dict, list, list]:
    straight = Trainer(build_config(_cfg(f"{root}/straight")))
    straight.fit()
    first = Trainer(build_config(_cfg(f"{root}/resumed")))
    first.fit(until_step=stop_at)
    assert first.step == stop_at
    second = Trainer(build_config({**_cfg(f"{root}/resumed"), "checkpoint": {"resume": True}}))
    assert second.step == stop_at and second.resumed_from is not None
    second.fit()
    return _state(straight), _state(second), straight.history, second.history


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stop_at", [15, 11])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, stop_at) -> None:
    # 1438 training samples -> 11 steps of 128 per epoch: 15 stops mid-way through
    # epoch 2, 11 on the last step of epoch 1 (its evaluation must still happen once).
    straight, resumed, hist_a, hist_b = _interrupted_vs_straight(str(tmp_path), stop_at=stop_at)
    _assert_bitwise(straight, resumed)
    assert hist_a[-1] == hist_b[-1]  # same final evaluation
    if stop_at == 11:
        first_eval = hist_a[0]
        resumed_log = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
        evals = [line for line in resumed_log if '"event": "eval"' in line]
        assert len(evals) == len(hist_a) == 2 and f'"step": {first_eval["step"]}' in evals[0]


def _ddp_resume(rank: int, world: int, root: str) -> tuple[dict, dict]:
    straight, resumed, _, _ = _interrupted_vs_straight(root, stop_at=7)
    return straight, resumed


def test_ddp_resume_bit_for_bit_at_world_2(tmp_path) -> None:
    results = run_ranks(_ddp_resume, 2, args=(str(tmp_path),), timeout=180)
    for straight, resumed in results:
        _assert_bitwise(straight, resumed)


def _stop_at_world_2(rank: int, world: int, root: str) -> int:
    cfg = _cfg(root, max_steps=14)
    cfg["model"] = {"name": "cnn", "args": {"dropout": 0.0}}
    trainer = Trainer(build_config(cfg))
    trainer.fit(until_step=6)
    return trainer.step


def test_checkpoint_from_world_2_resumes_on_one_worker(tmp_path) -> None:
    root = str(tmp_path / "w2")
    assert run_ranks(_stop_at_world_2, 2, args=(root,), timeout=180) == [6, 6]
    cfg = _cfg(root, max_steps=14)
    cfg["model"] = {"name": "cnn", "args": {"dropout": 0.0}}
    resumed = Trainer(build_config({**cfg, "checkpoint": {"resume": True}}))
    assert resumed.step == 6
    resumed.fit()
    straight_cfg = {**cfg, "logging": {"run_dir": str(tmp_path / "s"), "progress": False}}
    straight = Trainer(build_config(straight_cfg))
    straight.fit()
    a, b = _state(straight), _state(resumed)
    for key in a:  # same global batches; only the float summation order differs
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_atomic_save_keeps_last_k_and_no_temporaries(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save({"payload": torch.full((3,), float(step))}, step)
    assert [p.name for p in manager.list()] == ["step_00000002.pt", "step_00000003.pt"]
    assert sorted(os.listdir(tmp_path)) == ["step_00000002.pt", "step_00000003.pt"]
    state = load_checkpoint(manager.latest())
    assert state["step"] == 3 and torch.equal(state["payload"], torch.full((3,), 3.0))


def test_truncated_checkpoint_is_a_clear_error(tmp_path) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save({"payload": torch.randn(1000)}, 5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} is truncated or corrupt (")
    assert message.endswith("delete it to resume from the previous checkpoint")
    assert "\n" not in message


def test_missing_and_foreign_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a distml checkpoint"):
        load_checkpoint(foreign)
