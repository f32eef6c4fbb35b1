"""The mesh strategy through the Trainer: pp, tp and dp hybrids equal the single-process run.

Each plan trains a tiny GPT on text for 5 steps (SGD with momentum, gradient
clipping active, float32) and must reproduce the single-process Trainer's
per-step losses, test loss and final parameters (read back from the plan's
sharded checkpoint, so the checkpoint layout is checked at the same time).
A checkpoint written at tp=2 after 3 steps continues single-process and at
pp=2 with the reference's losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mesh_case import TEXT, metric_losses, tiny_text_cfg

from distml.config import build_config
from distml.testing import run_ranks

STEPS = 5


def _cfg(run_dir: Path, text: Path, **parallel: Any) -> dict[str, Any]:
    return tiny_text_cfg(run_dir, text, parallel, steps=STEPS)


def _fit(cfg: dict[str, Any], until: int | None = None) -> dict[str, Any]:
    from distml.train.trainer import Trainer

    return Trainer(build_config(cfg)).fit(until_step=until)


def _plans(rank: int, world: int, root: str, text: str, plans: list[tuple[str, dict]]) -> dict:
    out = {}
    for name, spec in plans:
        until = spec.pop("until", None)
        resume = spec.pop("resume", None)
        cfg = _cfg(Path(root) / name, Path(text), **spec)
        if resume is not None:
            cfg["checkpoint"]["resume"] = resume
        out[name] = _fit(cfg, until)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mesh")
    text = root / "corpus.txt"
    text.write_text(TEXT)
    ref_dir = root / "ref"
    ref = _fit(_cfg(ref_dir, text))
    from distml.train.checkpoint import load_checkpoint

    ref_state = load_checkpoint(ref["checkpoint"])["model"]
    return {
        "root": root,
        "text": text,
        "ref": ref,
        "ref_losses": metric_losses(ref_dir),
        "ref_state": ref_state,
    }


@pytest.fixture(scope="module")
def world2(setup: dict[str, Any]) -> dict[str, Any]:
    root = setup["root"]
    tp_ckpt = str(root / "tp_part" / "ckpt" / "step_00000003.dcp")
    plans = [
        ("pp_gpipe", {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 2}),
        ("pp_1f1b", {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}),
        ("tp", {"tp": 2}),
        ("tp_part", {"tp": 2, "until": 3}),
        ("tp_to_pp", {"pp": 2, "pp_microbatches": 2, "resume": tp_ckpt}),
    ]
    args = (str(root), str(setup["text"]), plans, setup["ref"]["checkpoint"], _tokens())
    results = run_ranks(_world2, 2, args=args, timeout=200)
    return {**results[0], "inference": [r["inference"] for r in results]}


@pytest.fixture(scope="module")
def world4(setup: dict[str, Any]) -> dict[str, Any]:
    plans = [("dp_tp", {"dp": 2, "tp": 2}), ("dp_pp", {"dp": 2, "pp": 2})]
    args = (str(setup["root"]), str(setup["text"]), plans, setup["ref"]["checkpoint"], _tokens())
    results = run_ranks(_world4, 4, args=args, timeout=150)
    return {**results[0], "predict": [r["predict"] for r in results]}


def _world4(
    rank: int, world: int, root: str, text: str, plans: list, checkpoint: str, tokens: torch.Tensor
) -> dict[str, Any]:
    out = _plans(rank, world, root, text, plans)
    out["predict"] = _predict_dp(rank, world, checkpoint, tokens)
    return out


def _predict_dp(rank: int, world: int, checkpoint: str, tokens: torch.Tensor) -> dict[str, Any]:
    """distml predict's model-parallel path with dp=2: replicas take disjoint input shards."""
    from distml.inference.predict import model_from_checkpoint, predict_on_mesh
    from distml.parallel.mesh import build_mesh
    from distml.parallel.mesh_inference import build_inference_forward
    from distml.runtime.dist import DistContext
    from distml.train.checkpoint import load_checkpoint

    out = {}
    ctx = DistContext(rank=rank, world_size=world)
    for name, dims in (("dp_tp", (2, 1, 2)), ("dp_pp", (2, 2, 1))):
        model = model_from_checkpoint(load_checkpoint(checkpoint))
        forward = build_inference_forward(model, build_mesh(*dims), microbatches=2)
        out[name] = predict_on_mesh(forward, tokens, ctx, batch_size=2)
    return out


def _check_plan(setup: dict[str, Any], summary: dict[str, Any], name: str) -> None:
    from distml.parallel.mesh_checkpoint import load_full_model

    run_dir = setup["root"] / name
    torch.testing.assert_close(
        torch.tensor(metric_losses(run_dir)), torch.tensor(setup["ref_losses"]), rtol=1e-4, atol=0
    )
    assert summary["test_loss"] == pytest.approx(setup["ref"]["test_loss"], rel=1e-4)
    path = Path(summary["checkpoint"])
    assert path.name == f"step_{STEPS:08d}.dcp" and path.is_dir()
    _, model = load_full_model(path)
    state = model.state_dict()
    assert state.keys() == setup["ref_state"].keys()
    for key, value in state.items():
        torch.testing.assert_close(value, setup["ref_state"][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["pp_gpipe", "pp_1f1b", "tp"])
def test_world2_plans_equal_single_process(setup, world2, name) -> None:
    assert len(setup["ref_losses"]) == STEPS
    assert world2[name]["mesh"] == {
        "dp": 1,
        "pp": 2 if name.startswith("pp") else 1,
        "tp": 2 if name == "tp" else 1,
    }
    _check_plan(setup, world2[name], name)


@pytest.mark.parametrize("name", ["dp_tp", "dp_pp"])
def test_world4_hybrids_equal_single_process(setup, world4, name) -> None:
    _check_plan(setup, world4[name], name)


def test_tp_checkpoint_continues_at_pp2_and_single_process(setup, world2) -> None:
    ref = setup["ref_losses"]
    part = metric_losses(setup["root"] / "tp_part")
    assert len(part) == 3
    torch.testing.assert_close(torch.tensor(part), torch.tensor(ref[:3]), rtol=1e-4, atol=0)
    # tp=2 -> pp=2: the resumed run logs steps 4 and 5 only.
    resumed = metric_losses(setup["root"] / "tp_to_pp")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(ref[3:]), rtol=1e-4, atol=0)
    _check_plan(setup | {"ref_losses": ref[3:]}, world2["tp_to_pp"], "tp_to_pp")
    # tp=2 -> one process (no process group at all).
    cfg = _cfg(setup["root"] / "tp_to_single", setup["text"])
    cfg["checkpoint"]["resume"] = str(setup["root"] / "tp_part" / "ckpt" / "step_00000003.dcp")
    summary = _fit(cfg)
    single = metric_losses(setup["root"] / "tp_to_single")
    torch.testing.assert_close(torch.tensor(single), torch.tensor(ref[3:]), rtol=1e-4, atol=0)
    assert summary["test_loss"] == pytest.approx(setup["ref"]["test_loss"], rel=1e-4)


def _tokens() -> torch.Tensor:
    return torch.randint(32, (3, 16), generator=torch.Generator().manual_seed(5))


def _world2(
    rank: int, world: int, root: str, text: str, plans: list, checkpoint: str, tokens: torch.Tensor
) -> dict[str, Any]:
    out = _plans(rank, world, root, text, plans)
    out["inference"] = _inference(rank, world, checkpoint, tokens)
    return out


def _inference(rank: int, world: int, checkpoint: str, tokens: torch.Tensor) -> dict[str, Any]:
    """Logits and greedy generation of the reference checkpoint through tp=2 and pp=2."""
    from distml.inference.predict import model_from_checkpoint
    from distml.parallel.mesh import build_mesh
    from distml.parallel.mesh_inference import build_inference_forward, mesh_generate
    from distml.train.checkpoint import load_checkpoint

    out = {}
    plans = (("tp", (1, 1, 2), 1), ("pp", (1, 2, 1), 1), ("pp_microbatched", (1, 2, 1), 3))
    for name, dims, microbatches in plans:
        model = model_from_checkpoint(load_checkpoint(checkpoint))
        forward = build_inference_forward(model, build_mesh(*dims), microbatches=microbatches)
        out[name] = (forward(tokens), mesh_generate(forward, tokens[:, :4], 12))
    return out


def test_model_parallel_logits_and_generation_equal_single_process(setup, world2) -> None:
    from distml.inference.predict import model_from_checkpoint
    from distml.train.checkpoint import load_checkpoint

    tokens = _tokens()
    model = model_from_checkpoint(load_checkpoint(setup["ref"]["checkpoint"]))
    with torch.no_grad():
        logits = model(tokens)
        generated = model.generate(tokens[:, :4], 12, temperature=0)
    assert generated.shape == (3, 16)
    for rank_out in world2["inference"]:  # every rank returns the full answer
        for name in ("tp", "pp", "pp_microbatched"):
            got_logits, got_tokens = rank_out[name]
            torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5, msg=name)
            assert torch.equal(got_tokens, generated), name


def test_model_parallel_predict_with_dp2_shards_inputs_and_equals_single_process(
    setup, world4
) -> None:
    from distml.inference.predict import model_from_checkpoint
    from distml.train.checkpoint import load_checkpoint

    tokens = _tokens()  # 3 rows: replicas get 2 and 1 (uneven shards)
    model = model_from_checkpoint(load_checkpoint(setup["ref"]["checkpoint"]))
    with torch.no_grad():
        logits = model(tokens)
    for rank, rank_out in enumerate(world4["predict"]):
        for name in ("dp_tp", "dp_pp"):
            if rank == 0:  # only the world's rank 0 holds (and writes) the gathered output
                torch.testing.assert_close(rank_out[name], logits, rtol=1e-5, atol=1e-5, msg=name)
            else:
                assert rank_out[name] is None, (rank, name)
