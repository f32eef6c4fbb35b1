"""Activation recomputation and bf16 mixed precision under parallel.pp/tp, through the Trainer.

A tiny GPT trains 5 steps on text (SGD with momentum, clipping active) at pp=2
(1f1b, 4 micro-batches) and at tp=2, in one pair of processes:

* ``memory.recompute`` full / selective / every_k must not change the math:
  per-step losses equal the single-process run *without* recomputation, and
  the sharded checkpoint holds the reference's parameters under plain names;
* ``schedule.precision=bf16`` must track the single-process bf16 run (loss
  per step and test loss through the mesh evaluation) and learn;
* ``schedule.precision=fp16`` (loss scaled inside the step, overflow agreed
  over the world) must track the single-process fp16 run;
* ``recompute=auto`` stays refused with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mesh_case import TEXT, metric_losses, tiny_text_cfg

from distml.cli.main import main
from distml.config import ParallelSection, build_config
from distml.errors import ConfigError
from distml.testing import run_ranks

STEPS = 5
PP = {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}
TP = {"tp": 2}
# name -> (parallel section, schedule.precision, memory.recompute)
PLANS: dict[str, tuple[dict[str, Any], str, str]] = {
    "pp_full": (PP, "fp32", "full"),
    "pp_selective": (PP, "fp32", "selective"),
    "pp_every_k": (PP, "fp32", "every_k"),  # n_layer=2, k=2: stage 0 recomputes, stage 1 not
    "tp_full": (TP, "fp32", "full"),
    "tp_selective": (TP, "fp32", "selective"),
    "pp_bf16": (PP, "bf16", "none"),
    "tp_bf16": (TP, "bf16", "none"),
    "pp_fp16": (PP, "fp16", "none"),
    "tp_fp16": (TP, "fp16", "none"),
}
AUTO = (
    "memory.recompute=auto is not supported with parallel.pp/tp (its budget planner profiles "
    "the whole model in one process); use memory.recompute=full, every_k or selective"
)


def _cfg(
    run_dir: Path,
    text: Path,
    parallel: dict[str, Any] | None = None,
    precision: str = "fp32",
    recompute: str = "none",
) -> dict[str, Any]:
    return tiny_text_cfg(
        run_dir, text, parallel, steps=STEPS, precision=precision, recompute=recompute
    )


def _fit(cfg: dict[str, Any]) -> dict[str, Any]:
    from distml.train.trainer import Trainer

    return Trainer(build_config(cfg)).fit()


def _fit_watched(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fit, and record what ran: recompute wrappers, recomputations, the LM head's dtype."""
    from distml.memory.recompute import CheckpointWrapper
    from distml.train.trainer import Trainer

    trainer = Trainer(build_config(cfg))
    # What this rank trains: its pipeline stages, or the whole tp-sharded model.
    modules = list(trainer.train_module.modules())
    wrappers = [m for m in modules if isinstance(m, CheckpointWrapper)]
    calls = {"outer": 0, "inner": 0}
    dtypes: set[str] = set()

    def count(module: torch.nn.Module, key: str) -> None:
        # Counted in forward itself: module hooks do not fire during checkpoint recomputation.
        forward = module.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[key] += 1
            return forward(*args, **kwargs)

        module.forward = counted  # type: ignore[method-assign]

    for w in wrappers:
        count(w, "outer")
        count(w.inner, "inner")
    head = trainer.raw_model.lm_head  # the (tp-sharded) LM head: its output shows the autocast
    if not head.weight.is_meta:
        head.register_forward_hook(lambda _m, _a, out: dtypes.add(str(out.dtype)))
    summary = trainer.fit()
    # Every inner call not made by its wrapper's own forward is a recomputation in backward.
    return summary | {
        "wrappers": len(wrappers),
        "recomputed": calls["inner"] - calls["outer"],
        "head_dtypes": sorted(dtypes),
    }


def _plans(rank: int, world: int, root: str, text: str) -> dict[str, Any]:
    return {
        name: _fit_watched(_cfg(Path(root) / name, Path(text), parallel, precision, recompute))
        for name, (parallel, precision, recompute) in PLANS.items()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from distml.train.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("mesh_memory")
    text = root / "corpus.txt"
    text.write_text(TEXT)
    ref = _fit(_cfg(root / "ref", text))
    ref_bf16 = _fit(_cfg(root / "ref_bf16", text, precision="bf16"))
    ref_fp16 = _fit(_cfg(root / "ref_fp16", text, precision="fp16"))
    plans = run_ranks(_plans, 2, args=(str(root), str(text)), timeout=180)
    return {
        "root": root,
        "ref": ref,
        "ref_bf16": ref_bf16,
        "ref_fp16": ref_fp16,
        "ref_state": load_checkpoint(ref["checkpoint"])["model"],
        "plans": plans,
    }


# Wrappers in what each rank runs (2 blocks; selective wraps attn and mlp of each).
WRAPPERS = {
    "pp_full": [1, 1],
    "pp_selective": [2, 2],
    "pp_every_k": [1, 0],
    "tp_full": [2, 2],
    "tp_selective": [4, 4],
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_recompute_keeps_the_math(runs, name) -> None:
    import torch.distributed.checkpoint as dcp

    from distml.parallel.mesh_checkpoint import load_full_model

    ranks = runs["plans"]
    # The stages (pp) and the sharded model (tp) run the wrappers, and they recompute.
    assert [r[name]["wrappers"] for r in ranks] == WRAPPERS[name]
    for r in ranks:
        assert (r[name]["recomputed"] > 0) == (r[name]["wrappers"] > 0)
    ref = metric_losses(runs["root"] / "ref")
    got = metric_losses(runs["root"] / name)
    assert len(got) == len(ref) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)
    summary = ranks[0][name]
    assert summary["test_loss"] == pytest.approx(runs["ref"]["test_loss"], rel=1e-5)
    # The sharded checkpoint names parameters as the plain model does (no wrapper segment)
    # and, for tp, gathers the shards: it holds the reference's parameters.
    _, model = load_full_model(summary["checkpoint"])
    state = model.state_dict()
    assert state.keys() == runs["ref_state"].keys()
    for key, value in state.items():
        torch.testing.assert_close(value, runs["ref_state"][key], rtol=1e-4, atol=1e-6, msg=key)
    # Optimizer state too: one momentum buffer per plain parameter name, so the checkpoint
    # resumes under any plan, with or without recomputation.
    stored = dcp.FileSystemReader(summary["checkpoint"]).read_metadata().state_dict_metadata
    expected = {f"model.{k}" for k in state} | {
        f"optim.{n}.momentum_buffer" for n, _ in model.named_parameters()
    }
    assert set(stored) == expected


@pytest.mark.parametrize("name", ["pp_bf16", "tp_bf16"])
def test_bf16_tracks_single_process_bf16(runs, name) -> None:
    # The LM head ran under bf16 autocast (on both tp ranks; on the last pipeline stage).
    heads = [r[name]["head_dtypes"] for r in runs["plans"]]
    assert heads == ([[], ["torch.bfloat16"]] if name == "pp_bf16" else [["torch.bfloat16"]] * 2)
    assert runs["plans"][0]["tp_full"]["head_dtypes"] == ["torch.float32"]
    ref = metric_losses(runs["root"] / "ref_bf16")
    got = metric_losses(runs["root"] / name)
    assert len(got) == STEPS
    # Not bit-equal, because bf16 rounds at different places: under tp the row-parallel
    # layers round their partial sums to bf16 before the all-reduce adds them (a single
    # process accumulates in fp32 inside the matmul and rounds once); the pipeline's
    # weight gradients leave the bf16 matmuls rounded per micro-batch and are summed in
    # fp32, not rounded once for the whole batch. bf16 keeps 8 bits of mantissa (relative
    # steps of 2^-8 = 4e-3), so a few steps of training agree to about 1e-2, not 1e-5.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-2, atol=0)
    assert got[-1] < got[0] - 0.1  # it learns
    # Evaluation ran through MeshForward under bf16 autocast.
    test_loss = runs["plans"][0][name]["test_loss"]
    assert test_loss == pytest.approx(runs["ref_bf16"]["test_loss"], rel=2e-2)


@pytest.mark.parametrize("name", ["pp_fp16", "tp_fp16"])
def test_fp16_tracks_single_process_fp16(runs, name) -> None:
    ref = metric_losses(runs["root"] / "ref_fp16")
    got = metric_losses(runs["root"] / name)
    assert len(got) == STEPS and got[-1] < got[0] - 0.1  # it learns
    # fp16 keeps 11 bits of mantissa; partial sums round at other places under pp/tp.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-3, atol=0)
    for rank in runs["plans"]:  # the same steps ran everywhere, none skipped at 2^16
        assert rank[name]["skipped_steps"] == runs["ref_fp16"]["skipped_steps"] == 0
        assert rank[name]["loss_scale"] == runs["ref_fp16"]["loss_scale"]


def _overflow_on_one_rank(rank: int, world: int) -> dict[str, Any]:
    from distml.memory.precision import LossScaler

    out: dict[str, Any] = {}
    for sync in (True, False):
        param = torch.nn.Parameter(torch.ones(3))
        scaler = LossScaler("fp16", "cpu", [param], init_scale=4.0, sync_overflow=sync)
        stepped = []
        for bad_rank in (0, None):  # step 1: only rank 0 overflows; step 2: nobody
            param.grad = torch.full((3,), scaler.step_scale())
            if rank == bad_rank:
                param.grad[1] = float("inf")
            stepped.append(scaler.step(lambda: None))
        out[f"sync={sync}"] = (stepped, scaler.scale_value)
    return out


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank() -> None:
    ranks = run_ranks(_overflow_on_one_rank, 2, timeout=60)
    for r in ranks:
        assert r["sync=True"] == ([False, True], 2.0)  # skipped, scale backed off once
    # Without the world-wide check the ranks disagree: rank 1 would step alone.
    assert [r["sync=False"][0] for r in ranks] == [[False, True], [True, True]]


def test_auto_recompute_refused_with_one_line(tmp_path, capsys) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    common = [
        "train",
        "model.name=gpt",
        "model.args={n_layer: 2, n_head: 2, n_embd: 16, vocab_size: 32}",
        "data.name=text",
        f"data.path={text}",
        "data.seq_len=16",
        "data.global_batch_size=8",
        f"logging.run_dir={tmp_path}",
        "--nproc",
        "2",
    ]
    code = main([*common, "parallel.tp=2", "memory.recompute=auto", "memory.budget_mb=1"])
    assert code == 2
    assert capsys.readouterr().err == f"distml: error: {AUTO}\n"
    # A Trainer built directly (no pre-launch check) meets the same line.
    from distml.parallel.mesh_strategy import build_strategy

    with pytest.raises(ConfigError) as auto:
        build_strategy(ParallelSection(tp=2), recompute="auto")
    assert str(auto.value) == AUTO
