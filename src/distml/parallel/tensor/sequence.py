"""Sequence parallelism (Megatron-LM SP) on top of the tensor-parallel plan.

Plain tensor parallelism leaves every activation outside the parallel regions
(layer norms, dropout, residual adds, the embedding output) whole and
replicated on all tp ranks. Sequence parallelism splits those along the
sequence: each rank holds (B, T/tp, C). The layers' collectives change with it
(see :mod:`.comm` and :mod:`.layers`): a column-parallel region is entered by
all-gathering the sequence (reduce-scatter backward), a row-parallel region
and the vocabulary-parallel embedding are left by reduce-scattering onto
sequence shards (all-gather backward), and the LM head all-gathers the
sequence so the vocabulary-parallel loss sees every position.

What this module adds to a tensor-parallel GPT or BERT:

* position (and token-type) embeddings look up this rank's positions only
  (a forward pre-hook slices their ids);
* the dropouts on sequence shards become :class:`SequenceParallelDropout`:
  each rank keeps its chunk of one full-sequence mask drawn from the shared
  random state (see the class for why);
* every replicated parameter (layer norms, row-parallel biases, position
  embeddings, BERT's head dense layer) sees only its rank's positions, so its
  gradient is partial: a hook on the parameter all-reduces it over tp as it
  is produced. A hook rather than a step in the strategy keeps the model
  self-contained: any training loop (the mesh strategy, a plain loop in a
  test, gradient accumulation, recomputation) gets the true gradient, at the
  price of one small all-reduce per replicated parameter per backward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import ConfigError
from distml.parallel.tensor.comm import sequence_length_message
from distml.parallel.tensor.state import sharded_entries


class SequenceParallelDropout(nn.Dropout):
    """Dropout of a (B, T/tp, C) sequence shard: this rank's slice of a full-sequence mask.

    Every tp rank draws the mask of the whole (B, T, C) sequence from the
    default generator and keeps its own positions. So ranks get different
    masks for different positions (one full mask, as without tp), the random
    streams of the tp ranks stay in lockstep (the same draws on every rank,
    which the replicated-dropout check and attention dropout inside the
    tensor-parallel regions rely on) and no extra generator state has to be
    seeded or checkpointed. The cost is drawing tp times more random numbers than the shard
    needs, a transient full-size buffer; nothing more is kept for backward.
    """

    def __init__(self, p: float, group: dist.ProcessGroup, dim: int = 1) -> None:
        super().__init__(p)
        self.group = group
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        width = x.shape[self.dim]
        full = list(x.shape)
        full[self.dim] = width * size
        keep = 1.0 - self.p
        noise = x.new_empty(full).bernoulli_(keep).narrow(self.dim, rank * width, width)
        return x * noise.div(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, sequence_dim={self.dim}"


def supports_sequence_parallel(model: nn.Module) -> bool:
    """distml's GPT and masked-LM BERT (bert-qa's span head reads whole sequences)."""
    from distml.models.bert import BERT
    from distml.models.gpt import GPT

    if isinstance(model, GPT):
        return True
    return isinstance(model, BERT) and getattr(model, "head", None) is not None


def check_sequence_parallel(
    model: nn.Module | None, *, tp: int, pp: int = 1, seq_len: int | None = None
) -> None:
    """One-line ConfigErrors for a sequence-parallel plan; with tp=1 the option is ignored."""
    if tp == 1:
        return  # nothing to split: the model runs as without sequence parallelism
    if pp > 1:
        raise ConfigError(
            "parallel.sequence_parallel needs parallel.pp=1 (pipeline stages send and "
            "evaluate full-sequence activations); set parallel.pp=1 or sequence_parallel: false"
        )
    if model is not None and not supports_sequence_parallel(model):
        raise ConfigError(
            "sequence parallelism supports model gpt and bert (masked LM), not "
            f"{type(model).__name__}; set parallel.sequence_parallel: false"
        )
    if seq_len is not None and seq_len % tp:
        raise ConfigError(sequence_length_message(seq_len, tp))


def _local_ids(
    group: dist.ProcessGroup, module: nn.Module, args: tuple[Any, ...]
) -> tuple[Any, ...]:
    # Position ids (T,) or token-type ids (B, T): keep this rank's positions.
    ids = args[0]
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    length = ids.shape[-1]
    if length % size:
        raise ConfigError(sequence_length_message(length, size))
    chunk = length // size
    return (ids.narrow(-1, rank * chunk, chunk), *args[1:])


def shard_position_lookup(embedding: nn.Module, group: dist.ProcessGroup) -> None:
    """Make ``embedding`` look up only this rank's positions of its (..., T) ids."""
    embedding.register_forward_pre_hook(functools.partial(_local_ids, group))


def shard_dropout(parent: nn.Module, name: str, group: dist.ProcessGroup) -> None:
    """Replace the ``nn.Dropout`` ``parent.name`` by its sequence-shard version."""
    old = getattr(parent, name)
    assert isinstance(old, nn.Dropout), f"{name} is {type(old).__name__}, expected Dropout"
    setattr(parent, name, SequenceParallelDropout(old.p, group))


def _sum_over_tp(group: dist.ProcessGroup, grad: torch.Tensor) -> torch.Tensor:
    # A tensor hook must not change ``grad`` in place; return the summed copy.
    total = grad.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total


def sum_replicated_gradients(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Hook every replicated (unsharded) parameter to all-reduce its gradient over tp.

    Call after the tensor-parallel layers are in place. Under sequence
    parallelism every replicated parameter of GPT and BERT acts on sequence
    shards, so its per-rank gradient is the part from this rank's positions.
    The hook fires once per backward with the parameter's total gradient for
    that pass (before accumulation into ``.grad``), so gradient accumulation
    stays correct. Returns the number of hooked parameters.
    """
    sharded = {id(getattr(layer, name)) for layer, name in sharded_entries(model).values()}
    hooked = 0
    for p in model.parameters():
        if id(p) not in sharded and p.requires_grad:
            p.register_hook(functools.partial(_sum_over_tp, group))
            hooked += 1
    return hooked


def sequence_parallel_gpt(model: Any, group: dist.ProcessGroup) -> None:
    """The sequence-shard pieces of a GPT whose layers are already tensor-parallel."""
    shard_position_lookup(model.wpe, group)
    shard_dropout(model, "drop", group)
    for block in model.blocks:
        shard_dropout(block.attn, "resid_drop", group)
        shard_dropout(block.mlp, "drop", group)
    sum_replicated_gradients(model, group)


def sequence_parallel_bert(model: Any, group: dist.ProcessGroup) -> None:
    """The sequence-shard pieces of a masked-LM BERT whose layers are tensor-parallel."""
    emb: Any = model.embeddings
    shard_position_lookup(emb.pos, group)
    shard_position_lookup(emb.token_type, group)
    shard_dropout(emb, "drop", group)
    for block in model.blocks:
        shard_dropout(block.attn, "resid_drop", group)
        shard_dropout(block.mlp, "drop", group)
    sum_replicated_gradients(model, group)
