"""The ps strategy under the Trainer on 2 servers + 2 workers (one spawn for all runs).

Sync equals a single-process run on the same global batch and resumes exactly
from a checkpoint; async and ssp (with lossy codecs) learn digits to >= 90%
(each async/ssp worker evaluates its own half of the test split); ssp with
staleness 3 and a slowed worker lets the fast one run exactly 3 steps ahead
(workers no longer synchronise through the Trainer's per-step exchange).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from distml.config import build_config
from distml.testing import run_ranks
from distml.train.trainer import Trainer

BASE: dict[str, Any] = {
    "seed": 3,
    "model": {"name": "cnn", "args": {"dropout": 0.0}},
    "data": {"name": "digits", "global_batch_size": 32},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"epochs": 1, "max_steps": 4, "warmup_steps": 2, "eval_every_epochs": 0},
    "logging": {"progress": False},
}
PS = {"strategy": "ps", "servers": 2, "workers": 2, "consistency": "sync"}
STALENESS = 3
STALE_STEPS = 20  # fewer than one epoch (22 steps of 64)


def _cfg(run_dir: str, parallel: dict[str, Any] | None = None, resume: bool = False) -> Any:
    data: dict[str, Any] = {**BASE, "logging": {**BASE["logging"], "run_dir": run_dir}}
    if parallel is not None:
        data["parallel"] = parallel
    if resume:
        data["checkpoint"] = {"resume": True}
    return build_config(data)


# Asynchrony adds implicit momentum, so the async runs use a lower explicit one.
DIGITS: dict[str, Any] = {
    "seed": 3,
    "model": {"name": "mlp", "args": {"hidden": [64]}},
    "data": {"name": "digits", "global_batch_size": 64},
    "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.5},
    "schedule": {"epochs": 5, "eval_every_epochs": 5},
}


def _digits_cfg(run_dir: str, **parallel: Any) -> Any:
    return build_config(
        {
            **DIGITS,
            "parallel": {"strategy": "ps", "servers": 2, "workers": 2, **parallel},
            "logging": {"progress": False, "run_dir": run_dir},
        }
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def _ps_runs(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = Trainer(_cfg(f"{root}/full", PS))
    out["summary"] = full.fit()
    out["full"] = _weights(full)
    # Interrupted after 2 of 4 steps (checkpoint written), then resumed by fresh Trainers.
    Trainer(_cfg(f"{root}/cut", PS)).fit(until_step=2)
    resumed = Trainer(_cfg(f"{root}/cut", PS, resume=True))
    out["resumed_at"] = resumed.step
    resumed.fit()
    out["resumed"] = _weights(resumed)
    for name, parallel in {
        "async": {"consistency": "async", "ps_codec": "int8"},
        "ssp": {"consistency": "ssp", "staleness": 1, "ps_codec": "fp16"},
    }.items():
        trainer = Trainer(_digits_cfg(f"{root}/{name}", **parallel))
        out[name] = trainer.fit()
        out[f"{name}_weights"] = _weights(trainer)
    # ssp, staleness 3, worker 1 slowed by 40 ms a step: the gap reaches 3, never more.
    cfg = _digits_cfg(f"{root}/stale", consistency="ssp", staleness=STALENESS).to_dict()
    cfg["schedule"].update(epochs=1, max_steps=STALE_STEPS, eval_every_epochs=0)
    stale = Trainer(build_config(cfg))
    if rank == 1:
        step = stale.train_step

        def slow_step(batches: Any) -> Any:
            time.sleep(0.04)
            return step(batches)

        stale.train_step = slow_step  # type: ignore[method-assign]
    out["stale"] = stale.fit()
    server = getattr(stale.strategy, "server", None)
    out["stale_releases"] = list(server.stats.releases) if server is not None else []
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ps_sync_equals_single_process_resumes_and_async_ssp_learn(tmp_path) -> None:
    init = _weights(Trainer(_cfg(str(tmp_path / "init"))))
    ref_trainer = Trainer(_cfg(str(tmp_path / "single")))
    ref_trainer.fit()
    ref = _weights(ref_trainer)
    ranks = run_ranks(_ps_runs, 4, args=(str(tmp_path),), timeout=240)
    workers, servers = ranks[:2], ranks[2:]
    for worker in workers:
        _assert_close(worker["full"], ref)
        _assert_close(worker["resumed"], ref)  # shards + momentum came back from the checkpoint
        assert worker["resumed_at"] == 2
    assert workers[0]["summary"]["steps"] == 4
    assert workers[0]["summary"]["ps_servers"] == 2
    for server in servers:
        # One averaged update per global step on every server.
        assert server["summary"]["ps_role"] == "server"
        assert server["summary"]["ps_updates"] == 4
    shard_bytes = [s["summary"]["ps_shard_bytes"] for s in servers]
    assert sum(shard_bytes) == sum(v.numel() * 4 for k, v in ref.items())
    assert all(not torch.equal(init[k], ref[k]) for k in ref)  # the steps moved every tensor
    for name in ("async", "ssp"):
        summary = workers[0][name]
        assert summary["ps_consistency"] == name
        assert summary["test_accuracy"] >= 0.90, (name, summary["test_accuracy"])
        assert summary["ps_compression_ratio"] > 1.9  # int8 ~4x, fp16 2x on the pushes
        # Every push is its own update in async/ssp: 2 workers x 110 steps per server.
        assert [s[name]["ps_updates"] for s in servers] == [220, 220]
        assert workers[0][name]["steps"] == workers[1][name]["steps"] == 110
        # The last replies wait for every worker: both end on the same final model.
        for key, value in workers[0][f"{name}_weights"].items():
            assert torch.equal(value, workers[1][f"{name}_weights"][key]), key
    assert max(s["ssp"]["ps_max_gap"] for s in servers) <= 1
    for server in servers:
        gaps = [done - slowest for _, done, slowest in server["stale_releases"]]
        assert max(gaps) == STALENESS and server["stale"]["ps_updates"] == 2 * STALE_STEPS
    assert workers[0]["stale"]["steps"] == workers[1]["stale"]["steps"] == STALE_STEPS
