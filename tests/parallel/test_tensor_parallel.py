"""Tensor parallelism at tp=2 equals the single-process model; bad plans fail in one line."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from distml.errors import ConfigError
from distml.parallel.tensor import check_tensor_parallel_sizes
from distml.testing import run_ranks

STEPS = 5
LR = 0.5


def _gpt(seed: int = 0, **overrides: int) -> torch.nn.Module:
    from distml.models.gpt import GPT, GPTConfig

    args = {"vocab_size": 32, "block_size": 8, "n_layer": 2, "n_head": 4, "n_embd": 16}
    args.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(dropout=0.0, **args)).double()


def _bert(seed: int = 0) -> torch.nn.Module:
    from distml.models.bert import BERT, BERTConfig

    torch.manual_seed(seed)
    cfg = BERTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=4, n_embd=16, dropout=0.0)
    return BERT(cfg).double()


def _batches(n: int, vocab: int = 32, batch: int = 4, seq: int = 8, masked: bool = False) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(vocab, (batch, seq), generator=gen)
        y = torch.randint(vocab, (batch, seq), generator=gen)
        if masked:  # MLM: most positions are not predicted
            y = y.masked_fill(torch.rand(batch, seq, generator=gen) < 0.6, -100)
        out.append((x, y))
    return out


def _train(model, loss_fn, batches: list, params=None) -> list[float]:
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=LR)
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _full_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _count_all_reduces(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple:
    import torch.distributed as dist

    real = dist.all_reduce
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        loss = loss_fn(model(x), y)
        forward = calls["n"]
        loss.backward()
        backward = calls["n"] - forward
    finally:
        dist.all_reduce = real
    model.zero_grad()
    return forward, backward


def _tp_ranks(rank: int, world: int) -> dict:
    from distml.parallel.mesh import build_mesh
    from distml.parallel.tensor import (
        apply_tensor_parallel,
        full_state_dict,
        tensor_parallel_loss,
        vocab_parallel_cross_entropy,
    )

    mesh = build_mesh(1, 1, 2)
    tp_group = mesh.get_group("tp")
    out: dict = {}

    # Vocabulary-parallel cross-entropy against F.cross_entropy on the full logits.
    gen = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(10, (3, 5), generator=gen)
    targets[0, :2] = -100
    local = logits.detach().chunk(2, dim=-1)[rank].clone().requires_grad_()
    vocab_parallel_cross_entropy(local, targets, tp_group).backward()
    parallel = vocab_parallel_cross_entropy(local.detach(), targets, tp_group)
    _full_ce(logits, targets).backward()
    out["ce"] = (parallel, _full_ce(logits.detach(), targets), local.grad, logits.grad.chunk(2, -1))

    # GPT with vocabulary-sharded logits and the parallel loss, vs the same model unsharded.
    gpt = _gpt()
    reference = copy.deepcopy(gpt)
    apply_tensor_parallel(gpt, mesh, loss_parallel=True)
    out["shapes"] = (gpt.blocks[0].attn.q_proj.weight.shape, gpt.blocks[0].attn.num_local_heads)
    out["tied"] = gpt.lm_head.weight is gpt.wte.weight
    loss_fn = tensor_parallel_loss(gpt)
    x, y = _batches(1)[0]
    out["all_reduces"] = _count_all_reduces(gpt, loss_fn, x, y)
    batches = _batches(STEPS)
    out["gpt"] = (_train(gpt, loss_fn, batches), full_state_dict(gpt))
    out["gpt_ref"] = (_train(reference, _full_ce, batches), reference.state_dict())

    # BERT with gathered logits: any ordinary loss works unchanged.
    bert = _bert()
    bert_ref = copy.deepcopy(bert)
    apply_tensor_parallel(bert, mesh, loss_parallel=False)
    mlm = _batches(3, masked=True)
    out["bert"] = (_train(bert, _full_ce, mlm), full_state_dict(bert))
    out["bert_ref"] = (_train(bert_ref, _full_ce, mlm), bert_ref.state_dict())

    # Hugging Face's fused q/k/v Conv1D (W: in x 3C): each rank keeps its heads of q, k and v.
    from types import SimpleNamespace

    from distml.parallel.tensor import full_state_dict as gather
    from distml.parallel.tensor.hf_gpt2 import Conv1DColumnParallel

    conv = SimpleNamespace(weight=torch.randn(16, 48, generator=gen), bias=torch.randn(48))
    fused = Conv1DColumnParallel(conv, tp_group, parts=3)
    x = torch.randn(2, 3, 16, generator=gen)
    q, k, v = (x @ conv.weight).split(16, dim=-1)
    want = torch.cat([t.chunk(2, dim=-1)[rank] for t in (q, k, v)], dim=-1)
    out["fused_qkv"] = (fused(x) - fused.bias, want, gather(fused)["weight"], conv.weight)

    # Plans that cannot be sharded fail before anything is changed.
    errors = []
    for bad in ({"n_head": 3, "n_embd": 24}, {"vocab_size": 33}):
        try:
            apply_tensor_parallel(_gpt(**bad), mesh)
        except ConfigError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


def _assert_state_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-10, msg=key)


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    return run_ranks(_tp_ranks, 2, timeout=120)


def test_vocab_parallel_cross_entropy_equals_full_cross_entropy(tp_results) -> None:
    for rank, result in enumerate(tp_results):
        parallel, full, local_grad, full_grads = result["ce"]
        torch.testing.assert_close(parallel, full, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(local_grad, full_grads[rank], rtol=1e-12, atol=1e-12)


def test_tp2_gpt_trains_like_single_process(tp_results) -> None:
    shape, heads = tp_results[0]["shapes"]
    assert tuple(shape) == (8, 16) and heads == 2  # half the heads on each rank
    assert tp_results[0]["tied"]
    for result in tp_results:
        losses, state = result["gpt"]
        ref_losses, ref_state = result["gpt_ref"]
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
        )
        _assert_state_close(state, ref_state)
    # The updated weights moved, so equality is not trivially the initial state.
    init = _gpt().state_dict()
    assert not torch.equal(
        init["blocks.0.attn.q_proj.weight"], ref_state["blocks.0.attn.q_proj.weight"]
    )


def test_fused_qkv_shard_keeps_each_ranks_heads(tp_results) -> None:
    for result in tp_results:
        got, want, gathered, full = result["fused_qkv"]
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gathered, full, rtol=0, atol=0)


def test_tp2_all_reduce_count_is_one_per_pair_each_way(tp_results) -> None:
    # 2 blocks x (attention, mlp) = 4 pairs: one all-reduce each way per pair;
    # forward also the embedding (1) and the parallel loss (max, then sums: 2);
    # backward also the LM head's input gradient (1).
    assert tp_results[0]["all_reduces"] == (4 + 1 + 2, 4 + 1)


def test_tp2_bert_with_gathered_logits_trains_like_single_process(tp_results) -> None:
    for result in tp_results:
        losses, state = result["bert"]
        ref_losses, ref_state = result["bert_ref"]
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
        )
        _assert_state_close(state, ref_state)


def test_tp_plan_errors_are_one_line(tp_results) -> None:
    assert tp_results[0]["errors"] == [
        "parallel.tp=2 does not divide model.args.n_head=3 (attention is split by whole heads); choose a tp that divides 3",
        "parallel.tp=2 does not divide the vocabulary size 33 (the embedding is split by rows); set model.args.vocab_size=34",
    ]


def test_check_tensor_parallel_sizes_messages() -> None:
    check_tensor_parallel_sizes(4, n_head=8, n_embd=64, vocab_size=256)
    with pytest.raises(ConfigError, match=r"^parallel.tp=3 does not divide model.args.n_head=8 "):
        check_tensor_parallel_sizes(3, n_head=8, n_embd=64, vocab_size=256)
    with pytest.raises(ConfigError, match=r"^parallel.tp=4 does not divide model.args.n_embd=66;"):
        check_tensor_parallel_sizes(4, n_head=4, n_embd=66, vocab_size=256)
    with pytest.raises(ConfigError, match=r"set model.args.vocab_size=68$"):
        check_tensor_parallel_sizes(4, n_head=4, n_embd=64, vocab_size=65)


def _hf_gpt2_ranks(rank: int, world: int) -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel

    from distml.parallel.mesh import build_mesh
    from distml.parallel.tensor import apply_tensor_parallel, full_state_dict, tensor_parallel_loss

    cfg = GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).double()
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, build_mesh(1, 1, 2), loss_parallel=True)
    loss_fn = tensor_parallel_loss(model)

    def run(m: torch.nn.Module, fn) -> list[float]:
        return _train(lambda x: m(input_ids=x).logits, fn, _batches(3), m.parameters())

    losses = run(model, loss_fn)
    return losses, full_state_dict(model), run(reference, _full_ce), reference.state_dict()


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (pip install 'distml[hf]'); the plan is untested here",
)
def test_tp2_hugging_face_gpt2_trains_like_single_process() -> None:
    for losses, state, ref_losses, ref_state in run_ranks(_hf_gpt2_ranks, 2, timeout=120):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
        )
        _assert_state_close(state, ref_state)
