"""DDP at world size 2 equals a single-process run on the same global batch."""

from __future__ import annotations

import torch

from distml.config import build_config
from distml.testing import run_ranks
from distml.train.trainer import Trainer

BASE = {
    "seed": 3,
    "model": {"name": "cnn", "args": {"dropout": 0.0}},
    "data": {"name": "digits", "global_batch_size": 32},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"epochs": 1, "max_steps": 5, "warmup_steps": 2, "eval_every_epochs": 0},
    "logging": {"progress": False},
}


def _cfg(run_dir: str, accumulation: int) -> dict:
    return {
        **BASE,
        "schedule": {**BASE["schedule"], "accumulation_steps": accumulation},
        "logging": {**BASE["logging"], "run_dir": run_dir},
    }


def _train(cfg: dict, summary: dict | None = None) -> dict[str, torch.Tensor]:
    trainer = Trainer(build_config(cfg))
    result = trainer.fit()
    if summary is not None:
        summary.update(result)
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def _train_both(rank: int, world: int, root: str) -> list:
    runs: list = [_train(_cfg(f"{root}/ddp-acc{acc}", acc)) for acc in (1, 2)]
    # distml's own ring all-reduce as DDP's hook, and fp16 gradient compression.
    ring = _cfg(f"{root}/ring", 1)
    ring["parallel"] = {"allreduce_algorithm": "ring"}
    runs.append(_train(ring))
    fp16 = _cfg(f"{root}/fp16", 1)
    fp16["parallel"] = {"compression": "fp16"}
    summary: dict = {}
    runs.append(_train(fp16, summary))
    runs.append(summary)
    return runs


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_world2_equals_single_process_with_and_without_accumulation(tmp_path) -> None:
    init = Trainer(build_config(_cfg(str(tmp_path / "init"), 1))).raw_model.state_dict()
    ref = _train(_cfg(str(tmp_path / "single"), 1))
    ranks = run_ranks(_train_both, 2, args=(str(tmp_path),), timeout=180)
    for accumulated in (0, 1):
        _assert_same(ranks[0][accumulated], ranks[1][accumulated])  # replicas agree
        _assert_same(ranks[0][accumulated], ref)
    _assert_same(ranks[0][2], ref)  # ring all-reduce hook: same average
    fp16 = ranks[0][3]
    for key in ref:  # fp16 gradients: close, not equal
        torch.testing.assert_close(fp16[key], ref[key], rtol=1e-2, atol=1e-3)
    assert ranks[0][4]["compression"] == "fp16" and ranks[0][4]["compression_ratio"] == 2.0
    # The 5 steps really changed the weights, so equality above is meaningful.
    moved = [not torch.equal(init[k], ref[k]) for k in ref if ref[k].is_floating_point()]
    assert all(moved)
