"""fp16 mixed precision in the Trainer: training, loss-scale overflow, parity with GradScaler, resume.

The reference for the trainer's fp16 path is the loop torch documents for
``torch.amp.GradScaler`` (scale each micro-step, unscale once, clip, step,
update), written out by hand over the very batches the trainer draws.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distml.config import build_config
from distml.errors import ConfigError
from distml.memory import OffloadedOptimizer
from distml.memory.precision import LossScaler, autocast, check_strategy_support
from distml.memory.profiler import profile_memory
from distml.models.cnn import CNN, CNNConfig
from distml.testing import run_ranks
from distml.train.metrics import task_loss
from distml.train.trainer import Trainer


def _cfg(run_dir: Path, **extra: dict[str, Any]) -> Any:
    cfg: dict[str, Any] = {
        "model": {"name": "mlp"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"epochs": 1, "precision": "fp16", "eval_every_epochs": 0},
        "parallel": {"threads_per_worker": 1},
        "logging": {"run_dir": str(run_dir), "progress": False},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return build_config(cfg)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_fp16_training_lowers_the_loss_and_logs_the_scale(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, schedule={"epochs": 2, "eval_every_epochs": 1}))
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first
    assert summary["test_accuracy"] > 0.8
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())
    steps = [r for r in records if "event" not in r]
    assert all(r["loss_scale"] > 0 and r["skipped_steps"] >= 0 for r in steps)
    assert summary["loss_scale"] == trainer.scaler.scale_value
    assert summary["skipped_steps"] == trainer.scaler.skipped_steps


# The LR schedule advances on skipped steps by design; torch warns when the first one is.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_overflow_skips_the_step_lowers_the_scale_and_resume_keeps_it(tmp_path: Path) -> None:
    # A scale of 1e38 turns the fp16 logit gradients into inf on every step.
    cfg = _cfg(tmp_path, schedule={"loss_scale_init": 1e38}, checkpoint={"every_steps": 2})
    trainer = Trainer(cfg)
    before = _params(trainer.raw_model)
    trainer.fit(until_step=2)
    assert trainer.scaler.skipped_steps == 2
    assert trainer.scaler.scale_value == pytest.approx(1e38 / 4)
    assert all(
        torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters(), strict=True)
    )
    assert all(p.grad is None for p in trainer.raw_model.parameters())

    resumed = Trainer(
        _cfg(tmp_path, schedule={"loss_scale_init": 1e38}, checkpoint={"resume": True})
    )
    assert resumed.step == 2
    assert resumed.scaler.scale_value == pytest.approx(1e38 / 4)
    assert resumed.scaler.skipped_steps == 2


def test_accumulation_and_clipping_equal_a_hand_written_gradscaler_loop(tmp_path: Path) -> None:
    steps, accum, clip = 4, 2, 0.05
    cfg = _cfg(
        tmp_path,
        schedule={"max_steps": steps, "accumulation_steps": accum, "grad_clip": clip},
    )
    trainer = Trainer(cfg)
    ref = copy.deepcopy(trainer.raw_model)
    batches = []
    for micro, _ in trainer._batches(0, 0):
        batches.append(micro)
        if len(batches) == steps:
            break
    trainer.fit()

    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    for micro in batches:
        for x, y in micro:
            with torch.autocast("cpu", dtype=torch.float16):
                out = ref(x)
            scaler.scale(task_loss(out, y, "classification") / accum).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        assert norm > clip  # the clip really acts
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(ref.parameters(), trainer.raw_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == trainer.scaler.scale_value


@pytest.mark.parametrize(
    ("precision", "optimizer"), [("fp32", "adamw"), ("fp16", "adamw8bit")], ids=["fp32", "fp16"]
)
def test_offloaded_optimizer_equals_plain_stepping_in_the_trainer(
    tmp_path: Path, precision: str, optimizer: str
) -> None:
    common: dict[str, dict[str, Any]] = {
        "optimizer": {"name": optimizer, "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"max_steps": 5, "precision": precision, "warmup_steps": 2},
    }
    plain = Trainer(_cfg(tmp_path / "a", **common))
    off = Trainer(_cfg(tmp_path / "b", **common, memory={"offload_optimizer": True}))
    assert isinstance(off.optimizer, OffloadedOptimizer)
    plain.fit()
    off.fit()
    for a, b in zip(plain.raw_model.parameters(), off.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert off.scheduler.get_last_lr() == plain.scheduler.get_last_lr()


def test_offloaded_optimizer_resumes_from_a_trainer_checkpoint(tmp_path: Path) -> None:
    common: dict[str, dict[str, Any]] = {
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "schedule": {"max_steps": 6, "precision": "fp32"},
        "memory": {"offload_optimizer": True},
    }
    straight = Trainer(_cfg(tmp_path / "a", **common))
    straight.fit()
    Trainer(_cfg(tmp_path / "b", **common)).fit(until_step=3)
    resumed = Trainer(_cfg(tmp_path / "b", **common, checkpoint={"resume": True}))
    assert resumed.step == 3
    resumed.fit()
    for a, b in zip(straight.raw_model.parameters(), resumed.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_autocast_dtypes_and_a_disabled_scaler_passes_through() -> None:
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for precision, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        with autocast(precision, "cpu"):
            assert lin(x).dtype == dtype
    with autocast("fp16", "cpu"):
        assert lin(x).dtype == torch.float16
    scaler = LossScaler("bf16", "cpu", lin.parameters())
    loss = lin(x).sum()
    assert scaler.scale(loss) is loss
    assert scaler.metrics() == {} and scaler.state_dict() == {}
    ran: list[bool] = []
    assert scaler.step(lambda: ran.append(True)) and ran == [True]


def test_bad_combinations_fail_with_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        check_strategy_support("fp16", False, "ps")
    assert str(err.value) == (
        "schedule.precision=fp16 does not work with parallel.strategy=ps (overflowed steps "
        "could not be skipped on every rank); use precision bf16 or strategy ddp"
    )
    with pytest.raises(ConfigError) as err:
        check_strategy_support("fp32", True, "ps")
    assert str(err.value) == (
        "memory.offload_optimizer=true does not work with parallel.strategy=ps (the optimizer "
        "does not step on this process); set it false or use strategy ddp"
    )
    check_strategy_support("fp16", False, "ddp", model_parallel=True)  # overflow agreed
    with pytest.raises(ConfigError) as err:
        check_strategy_support("fp32", True, "ddp", model_parallel=True)
    assert str(err.value) == (
        "memory.offload_optimizer=true does not work with parallel.pp/tp > 1 (the optimizer "
        "does not step on this process); set it false or use strategy ddp"
    )
    check_strategy_support("fp16", True, "ddp")  # supported: no error
    with pytest.raises(ConfigError, match=r"invalid config value for 'schedule.precision'"):
        build_config({"schedule": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"schedule.precision must be one of fp32, bf16, fp16"):
        autocast("fp8", "cpu")


def _ddp_overflow_on_one_rank(rank: int, world_size: int) -> tuple[list[float], float, int]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler("fp16", "cpu", model.parameters(), init_scale=1024.0)
    x = torch.randn(3, 4) + rank
    for step in range(2):
        with autocast("fp16", "cpu"):
            out = model(x)
        loss = out.float().square().mean()
        if step == 0 and rank == 1:
            loss = loss * float("inf")  # only this rank overflows
        scaler.scale(loss).backward()
        scaler.step(opt.step)
        opt.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return flat.tolist(), scaler.scale_value, scaler.skipped_steps


def test_ddp_ranks_skip_the_same_overflowed_step() -> None:
    (p0, s0, k0), (p1, s1, k1) = run_ranks(_ddp_overflow_on_one_rank, 2, timeout=120)
    assert p0 == p1
    assert s0 == s1 == 512.0  # halved once, then one clean step (no growth yet)
    assert k0 == k1 == 1


def test_memory_profiler_accepts_fp16_and_predicts_its_peak() -> None:
    def report_for(precision: str) -> Any:
        torch.manual_seed(0)
        model = CNN(CNNConfig())
        x, y = torch.rand(64, 1, 8, 8), torch.randint(10, (64,))
        loss = torch.nn.functional.cross_entropy
        return profile_memory(model, x, y, loss, "sgd", precision=precision)

    report = report_for("fp16")
    assert report.precision == "fp16"
    # fp16 is predicted like bf16 (2-byte activations); CPU fp16 kernels keep fp32
    # temporaries the formula does not model (18% here; docs/memory.md), hence 25%.
    assert report.predicted_peak_bytes == report_for("bf16").predicted_peak_bytes
    assert report.measured_peak_bytes is not None
    assert abs(report.predicted_peak_bytes / report.measured_peak_bytes - 1) <= 0.25
    assert "bf16 autocast" not in {o.name for o in report.advice}
