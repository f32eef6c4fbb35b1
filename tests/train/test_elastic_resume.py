"""Elastic resume: stopped on 2 workers, resumed on 1, then on 3, same loss trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distml.config import build_config
from distml.testing import run_ranks
from distml.train.trainer import Trainer


def _cfg(run_dir: str, resume: bool) -> dict:
    return {
        "seed": 5,
        "model": {"name": "cnn", "args": {"dropout": 0.0}},
        "data": {"name": "digits", "global_batch_size": 48},  # divisible by 1, 2 and 3 workers
        "optimizer": {"name": "sgd", "lr": 0.15, "momentum": 0.9},
        "schedule": {"epochs": 1, "max_steps": 24, "warmup_steps": 4, "decay": "cosine",
                     "eval_every_epochs": 0},
        "checkpoint": {"resume": resume},
        "logging": {"run_dir": run_dir, "progress": False},
    }


def _run(rank: int, world: int, run_dir: str, resume: bool, until: int | None) -> int:
    trainer = Trainer(build_config(_cfg(run_dir, resume)))
    trainer.fit(until_step=until)
    return trainer.step


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            out[record["step"]] = record["loss"]
    return out


def test_stop_on_2_resume_on_1_then_3_matches_uninterrupted(tmp_path) -> None:
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    assert run_ranks(_run, 2, args=(str(straight), False, None), timeout=180) == [24, 24]
    assert run_ranks(_run, 2, args=(str(elastic), False, 8), timeout=180) == [8, 8]
    assert _run(0, 1, str(elastic), True, 16) == 16
    assert run_ranks(_run, 3, args=(str(elastic), True, None), timeout=240) == [24, 24, 24]
    reference, resumed = _losses(straight), _losses(elastic)
    assert sorted(resumed) == list(range(1, 25)) == sorted(reference)  # no lost or repeated steps
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
    assert reference[24] < reference[1] * 0.9  # it trained
