"""Sequence parallelism at tp=2 equals the single-process model; bad plans fail in one line.

Library level (float64, dropout 0): loss and every parameter gradient of a
sequence-parallel GPT and BERT equal the plain model's, layer norms and
position embeddings included, with gradient accumulation and with the
backend's reduce-scatter as well as the all-reduce fallback. Trainer level:
``parallel: {tp: 2, sequence_parallel: true}`` reproduces the single-process
per-step losses, test loss and final parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mesh_case import TEXT, metric_losses, tiny_text_cfg

from distml.errors import ConfigError
from distml.testing import run_ranks

SEQ_ERROR = (
    "parallel.sequence_parallel splits the sequence over parallel.tp=2 ranks, but the "
    "sequence length {n} (data.seq_len) is not divisible by 2; set data.seq_len to a multiple of 2"
)


def _gpt(**overrides: Any) -> torch.nn.Module:
    from distml.models.gpt import GPT, GPTConfig

    args = {"vocab_size": 32, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}
    args.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(dropout=0.0, **args)).double()


def _bert() -> torch.nn.Module:
    from distml.models.bert import BERT, BERTConfig

    torch.manual_seed(0)
    cfg = BERTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return BERT(cfg).double()


def _batches(n: int, masked: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(32, (3, 8), generator=gen)
        y = torch.randint(32, (3, 8), generator=gen)
        if masked:  # MLM: most positions are not predicted
            y = y.masked_fill(torch.rand(3, 8, generator=gen) < 0.6, -100)
        out.append((x, y))
    return out


def _full_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the unsharded model's (sharded ones all-gathered)."""
    import torch.distributed as dist

    from distml.parallel.tensor.state import sharded_entries

    sharded = sharded_entries(model)
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name in sharded:
            layer, attr = sharded[name]
            parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(layer.group))]
            dist.all_gather(parts, p.grad.contiguous(), group=layer.group)
            out[name] = layer.full_from_shards(attr, parts)
        else:
            out[name] = p.grad.clone()
    return out


def _losses_and_grads(model: torch.nn.Module, loss_fn: Any, batches: list) -> tuple[list, dict]:
    """Two backward passes into the same .grad (gradient accumulation)."""
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    if hasattr(model, "tensor_parallel"):
        return losses, _full_grads(model)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(model_fn: Any, mesh: Any, batches: list) -> dict[str, Any]:
    from distml.parallel.tensor import apply_tensor_parallel, tensor_parallel_loss

    model = model_fn()
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, mesh, loss_parallel=True, sequence_parallel=True)
    return {
        "sp": _losses_and_grads(model, tensor_parallel_loss(model), batches),
        "ref": _losses_and_grads(reference, _full_ce, batches),
        "model": model,
    }


def _sp_ranks(rank: int, world: int) -> dict[str, Any]:
    import distml.parallel.tensor.comm as comm
    from distml.parallel.mesh import build_mesh
    from distml.parallel.tensor import SequenceParallelDropout, apply_tensor_parallel

    mesh = build_mesh(1, 1, 2)
    group = mesh.get_group("tp")
    out: dict[str, Any] = {}

    gpt = _compare(_gpt, mesh, _batches(2))
    model = gpt.pop("model")
    out["gpt"] = gpt
    out["gpt_shapes"] = {
        "embedding": tuple(model.drop(model.wte(_batches(1)[0][0])).shape),
        "wpe_hooked": len(model.wpe._forward_pre_hooks),
    }
    # T=7 does not split over 2 ranks: the first collective refuses it on every rank.
    try:
        model(torch.zeros(2, 7, dtype=torch.long))
    except ConfigError as exc:
        out["odd_seq"] = str(exc)

    # Untied LM head, and the backend's own reduce-scatter (NCCL's path; gloo has it in
    # recent torch), against the all-reduce fallback that gloo normally takes.
    real = comm.native_reduce_scatter
    comm.native_reduce_scatter = lambda group, device: True  # type: ignore[assignment]
    try:
        out["gpt_native"] = _compare(lambda: _gpt(tie_weights=False), mesh, _batches(1))
        out["gpt_native"].pop("model")
    finally:
        comm.native_reduce_scatter = real  # type: ignore[assignment]

    bert = _compare(_bert, mesh, _batches(2, masked=True))
    bert.pop("model")
    out["bert"] = bert

    # Dropout on sequence shards: each rank keeps its positions of one full mask drawn
    # from the shared random state, so the ranks' streams stay equal.
    x = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    drop = SequenceParallelDropout(0.5, group)
    shard = drop(x.chunk(2, dim=1)[rank])
    torch.manual_seed(5)
    # CPU dropout is bernoulli_ over a tensor of the input's shape: the same full mask.
    full = F.dropout(x, 0.5, training=True)
    out["dropout"] = (shard, full.chunk(2, dim=1)[rank])

    from distml.models.bert_qa import BERTForQA, BERTQAConfig

    try:
        apply_tensor_parallel(BERTForQA(BERTQAConfig(n_layer=1)), mesh, sequence_parallel=True)
    except ConfigError as exc:
        out["qa_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def sp_results() -> list[dict[str, Any]]:
    return run_ranks(_sp_ranks, 2, timeout=120)


def _assert_equal_runs(result: dict[str, Any]) -> None:
    losses, grads = result["sp"]
    ref_losses, ref_grads = result["ref"]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-12, msg=name)


def test_sp_gpt_loss_and_every_gradient_equal_single_process(sp_results) -> None:
    for result in sp_results:
        _assert_equal_runs(result["gpt"])
        grads = result["gpt"]["sp"][1]
        # The replicated parameters that only see a sequence shard are covered.
        for name in ("wpe.weight", "ln_f.weight", "blocks.0.ln_1.bias", "blocks.1.mlp.proj.bias"):
            assert grads[name].abs().sum() > 0, name
    # Activations between the parallel regions are sequence shards: (B, T/2, C).
    assert sp_results[0]["gpt_shapes"] == {"embedding": (3, 4, 16), "wpe_hooked": 1}


def test_sp_native_reduce_scatter_and_untied_head(sp_results) -> None:
    for result in sp_results:
        _assert_equal_runs(result["gpt_native"])


def test_sp_bert_mlm_equals_single_process(sp_results) -> None:
    for result in sp_results:
        _assert_equal_runs(result["bert"])


def test_sp_dropout_keeps_this_ranks_slice_of_one_full_mask(sp_results) -> None:
    shards = []
    for result in sp_results:
        got, want = result["dropout"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        shards.append(got == 0)
    assert not torch.equal(shards[0], shards[1])  # different positions, different masks


def test_sp_bad_sequence_and_models_fail_in_one_line(sp_results) -> None:
    assert sp_results[0]["odd_seq"] == SEQ_ERROR.format(n=7)
    assert sp_results[0]["qa_error"] == (
        "sequence parallelism supports model gpt and bert (masked LM), not BERTForQA; "
        "set parallel.sequence_parallel: false"
    )


def test_check_mesh_plan_sequence_parallel_errors() -> None:
    from distml.config import ParallelSection
    from distml.parallel.mesh_strategy import check_mesh_plan

    with torch.device("meta"):
        model = _gpt(block_size=16)
    sp = ParallelSection(tp=2, sequence_parallel=True)
    check_mesh_plan(sp, 2, model, seq_len=16)
    with pytest.raises(ConfigError) as info:
        check_mesh_plan(sp, 2, model, seq_len=15)
    assert str(info.value) == SEQ_ERROR.format(n=15)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel needs parallel.pp=1 "):
        check_mesh_plan(ParallelSection(tp=2, pp=2, sequence_parallel=True), 4, model)
    # tp=1 has nothing to split: the option is ignored (pp=2 alone is a valid plan).
    check_mesh_plan(ParallelSection(pp=2, sequence_parallel=True), 2, model, seq_len=15)


# ---- the Trainer: `distml train` with parallel {tp: 2, sequence_parallel: true}

STEPS = 4


def _cfg(run_dir: Path, text: Path, dropout: float = 0.0, **parallel: Any) -> dict[str, Any]:
    return tiny_text_cfg(run_dir, text, parallel, steps=STEPS, dropout=dropout)


def _fit(cfg: dict[str, Any]) -> dict[str, Any]:
    from distml.config import build_config
    from distml.train.trainer import Trainer

    return Trainer(build_config(cfg)).fit()


def _trainer_ranks(rank: int, world: int, root: str, text: str) -> dict[str, Any]:
    out = {}
    for name, dropout in (("sp", 0.0), ("sp_dropout", 0.1)):
        cfg = _cfg(Path(root) / name, Path(text), dropout, tp=2, sequence_parallel=True)
        out[name] = _fit(cfg)
    return out


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sp")
    text = root / "corpus.txt"
    text.write_text(TEXT)
    ref = _fit(_cfg(root / "ref", text))
    # tp=1: nothing to split, the option is ignored (the plain single-process path).
    ignored = _fit(_cfg(root / "tp1", text, sequence_parallel=True))
    world2 = run_ranks(_trainer_ranks, 2, args=(str(root), str(text)), timeout=150)
    return {"root": root, "ref": ref, "ignored": ignored, "world2": world2[0]}


def test_trainer_tp2_sequence_parallel_equals_single_process(trainer_runs) -> None:
    from distml.parallel.mesh_checkpoint import load_full_model
    from distml.train.checkpoint import load_checkpoint

    root, ref, summary = trainer_runs["root"], trainer_runs["ref"], trainer_runs["world2"]["sp"]
    ref_losses = metric_losses(root / "ref")
    assert len(ref_losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(metric_losses(root / "sp")), torch.tensor(ref_losses), rtol=1e-4, atol=0
    )
    assert summary["mesh"] == {"dp": 1, "pp": 1, "tp": 2}
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
    ref_state = load_checkpoint(ref["checkpoint"])["model"]
    _, model = load_full_model(Path(summary["checkpoint"]))
    state = model.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-6, msg=key)


def test_trainer_sequence_parallel_with_tp1_is_ignored(trainer_runs) -> None:
    root = trainer_runs["root"]
    assert metric_losses(root / "tp1") == pytest.approx(metric_losses(root / "ref"), rel=1e-6)


def test_trainer_sequence_parallel_with_dropout_trains(trainer_runs) -> None:
    losses = metric_losses(trainer_runs["root"] / "sp_dropout")
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
