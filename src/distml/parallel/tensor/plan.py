"""Tensor-parallel plans: shard distml's GPT and BERT in place over the mesh's tp axis.

Megatron's layout, per transformer block: q/k/v and ``mlp.fc`` are
column-parallel (each rank keeps whole heads / a slice of the hidden units),
``o_proj`` and ``mlp.proj`` are row-parallel. A forward pre-hook on ``attn``
and ``mlp`` enters the parallel region once, so each attention and each MLP
costs one all-reduce forward (in the row-parallel layer) and one backward (at
the region's entry). The token embedding is vocabulary-parallel; the LM head
shares its shard when the weights are tied, and either returns vocabulary-
sharded logits for :func:`~distml.parallel.tensor.loss.vocab_parallel_cross_entropy`
(``loss_parallel=True``) or all-gathers them. ``sequence_parallel=True``
also splits the activations outside the parallel regions (layer norms,
dropout, residuals) along the sequence; see :mod:`.sequence`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distml.errors import ConfigError
from distml.models.bert import BERT
from distml.models.gpt import GPT
from distml.models.layers import MLP, SelfAttention
from distml.parallel.mesh import axis_group, axis_size
from distml.parallel.tensor.comm import copy_to_region, gather_from_sequence
from distml.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from distml.parallel.tensor.loss import vocab_parallel_cross_entropy
from distml.parallel.tensor.sequence import (
    check_sequence_parallel,
    sequence_parallel_bert,
    sequence_parallel_gpt,
)


@dataclass(frozen=True)
class TensorParallelInfo:
    """What :func:`apply_tensor_parallel` did; attached to the model as ``tensor_parallel``."""

    group: dist.ProcessGroup
    size: int
    loss_parallel: bool
    #: Activations between the parallel regions are (B, T/tp, C) sequence shards.
    sequence_parallel: bool = False


def check_tensor_parallel_sizes(tp: int, n_head: int, n_embd: int, vocab_size: int) -> None:
    """One-line ConfigError unless tp splits heads, hidden units and vocabulary evenly."""
    if tp < 1:
        raise ConfigError(f"parallel.tp must be a positive integer, got {tp}")
    if n_head % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide model.args.n_head={n_head} (attention is split "
            f"by whole heads); choose a tp that divides {n_head}"
        )
    if n_embd % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide model.args.n_embd={n_embd}; "
            f"choose a tp that divides {n_embd}"
        )
    if vocab_size % tp:
        padded = -(-vocab_size // tp) * tp
        raise ConfigError(
            f"parallel.tp={tp} does not divide the vocabulary size {vocab_size} (the embedding "
            f"is split by rows); set model.args.vocab_size={padded}"
        )


def _enter_region(
    group: dist.ProcessGroup,
    sequence_parallel: bool,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # Sequence parallel: the input arrives as sequence shards; gather the whole sequence.
    enter = gather_from_sequence if sequence_parallel else copy_to_region
    return (enter(args[0], group), *args[1:]), kwargs


def _parallelize_attention(attn: SelfAttention, group: dist.ProcessGroup, sp: bool) -> None:
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group)  # type: ignore[assignment]
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group)  # type: ignore[assignment]
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group)  # type: ignore[assignment]
    attn.o_proj = RowParallelLinear.from_linear(  # type: ignore[assignment]
        attn.o_proj, group, sequence_parallel=sp
    )
    attn.register_forward_pre_hook(functools.partial(_enter_region, group, sp), with_kwargs=True)


def _parallelize_mlp(mlp: MLP, group: dist.ProcessGroup, sp: bool) -> None:
    mlp.fc = ColumnParallelLinear.from_linear(mlp.fc, group)  # type: ignore[assignment]
    mlp.proj = RowParallelLinear.from_linear(  # type: ignore[assignment]
        mlp.proj, group, sequence_parallel=sp
    )
    mlp.register_forward_pre_hook(functools.partial(_enter_region, group, sp), with_kwargs=True)


def _parallelize_blocks(blocks: nn.ModuleList, group: dist.ProcessGroup, sp: bool) -> None:
    for block in blocks:
        assert isinstance(block.attn, SelfAttention) and isinstance(block.mlp, MLP)
        _parallelize_attention(block.attn, group, sp)
        _parallelize_mlp(block.mlp, group, sp)


def _parallelize_gpt(
    model: GPT, group: dist.ProcessGroup, loss_parallel: bool, sp: bool = False
) -> None:
    cfg = model.config
    check_tensor_parallel_sizes(dist.get_world_size(group), cfg.n_head, cfg.n_embd, cfg.vocab_size)
    _parallelize_blocks(model.blocks, group, sp)
    tied = model.lm_head.weight is model.wte.weight
    wte = VocabParallelEmbedding.from_embedding(model.wte, group, sequence_parallel=sp)
    model.lm_head = ColumnParallelLinear.from_linear(  # type: ignore[assignment]
        model.lm_head,
        group,
        copy_input=True,
        gather_output=not loss_parallel,
        weight=wte.weight if tied else None,
        sequence_parallel=sp,
    )
    model.wte = wte  # type: ignore[assignment]
    if sp:
        sequence_parallel_gpt(model, group)


def _parallelize_bert(
    model: BERT, group: dist.ProcessGroup, loss_parallel: bool, sp: bool = False
) -> None:
    cfg = model.config
    check_tensor_parallel_sizes(dist.get_world_size(group), cfg.n_head, cfg.n_embd, cfg.vocab_size)
    _parallelize_blocks(model.blocks, group, sp)
    emb = model.embeddings
    tok = VocabParallelEmbedding.from_embedding(emb.tok, group, sequence_parallel=sp)
    # bert-qa has no MLM head (its 2-way span head stays replicated): only the
    # masked-LM model has a vocabulary-sized decoder to split.
    head = getattr(model, "head", None)
    if head is not None:
        tied = head.decoder.weight is emb.tok.weight
        head.decoder = ColumnParallelLinear.from_linear(
            head.decoder,
            group,
            copy_input=True,
            gather_output=not loss_parallel,
            weight=tok.weight if tied else None,
            sequence_parallel=sp,
        )
    emb.tok = tok  # type: ignore[assignment]
    if sp:
        sequence_parallel_bert(model, group)


def _is_span_model(model: nn.Module) -> bool:
    if isinstance(model, BERT) and getattr(model, "head", None) is None:
        return True
    inner = getattr(model, "hf", model)
    return type(inner).__name__ == "BertForQuestionAnswering"


def apply_tensor_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    loss_parallel: bool = True,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Shard ``model`` in place over the mesh's ``tp`` axis and return it.

    Every tp rank must hold the same full model (build it from the same seed)
    before the call. With ``loss_parallel`` the model returns this rank's
    vocabulary slice of the logits: train it with :func:`tensor_parallel_loss`.
    Otherwise logits are all-gathered and any ordinary loss works.
    ``sequence_parallel`` (GPT and masked-LM BERT only) keeps the activations
    between the parallel regions as sequence shards; inputs and logits keep
    their shapes, but the sequence length must be divisible by tp. With tp=1
    both options are ignored.
    """
    group = axis_group(mesh, "tp")
    size = axis_size(mesh, "tp")
    if size == 1:
        return model
    if sequence_parallel:
        check_sequence_parallel(model, tp=size)
    if isinstance(model, GPT):
        _parallelize_gpt(model, group, loss_parallel, sequence_parallel)
    elif isinstance(model, BERT):
        _parallelize_bert(model, group, loss_parallel, sequence_parallel)
    else:
        from distml.parallel.tensor.hf_bert import is_hf_bert, parallelize_hf_bert
        from distml.parallel.tensor.hf_gpt2 import is_hf_gpt2, parallelize_hf_gpt2

        if is_hf_gpt2(model):
            parallelize_hf_gpt2(model, group, loss_parallel)
        elif is_hf_bert(model):
            parallelize_hf_bert(model, group, loss_parallel)
        else:
            raise ConfigError(
                f"no tensor-parallel plan for model {type(model).__name__}; use "
                "parallel.tp=1 or one of: gpt, bert, bert-qa, hf-gpt2, hf-bert, hf-bert-qa"
            )
    check_same_rng_for_dropout(model, group)
    # Span (QA) heads are replicated: their logits are whole, so the ordinary loss applies.
    if _is_span_model(model):
        loss_parallel = False
    # A plain attribute (not a submodule): strategies and pipelines read it back.
    info = TensorParallelInfo(group, size, loss_parallel, sequence_parallel)
    setattr(model, "tensor_parallel", info)  # noqa: B010
    return model


def check_same_rng_for_dropout(model: nn.Module, group: dist.ProcessGroup) -> None:
    """With dropout, tp ranks must draw the same masks or their replicated activations diverge.

    Sequence parallelism keeps this rule: its dropouts draw one full-sequence
    mask from this shared state and each rank keeps its own positions
    (:class:`~distml.parallel.tensor.sequence.SequenceParallelDropout`), so the
    masks differ by position while the ranks' random streams stay equal.
    Attention-probability dropout inside the parallel region then draws the
    same mask pattern for each rank's local heads (as without sequence parallelism).
    """
    if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return
    raw = torch.get_rng_state().to(torch.float64)
    # Position-weighted sum: a fingerprint of the generator state, exact in float64.
    state = (raw * torch.arange(1, raw.numel() + 1, dtype=torch.float64)).sum().reshape(1)
    low_high = torch.cat([state, -state])
    dist.all_reduce(low_high, op=dist.ReduceOp.MIN, group=group)
    if float(low_high[0]) != -float(low_high[1]):
        raise ConfigError(
            "dropout with tensor parallelism needs the same random seed on all ranks of a "
            "tp group; seed by data-parallel rank, or set model.args.dropout=0"
        )


def tensor_parallel_loss(
    model: nn.Module, *, ignore_index: int = -100
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The LM loss for ``model``'s logits: vocabulary-parallel when they are sharded."""
    info: TensorParallelInfo | None = getattr(model, "tensor_parallel", None)
    if info is not None and info.loss_parallel:
        group = info.group

        def parallel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(logits, targets, group, ignore_index=ignore_index)

        return parallel_loss

    def full_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
        )

    return full_loss
