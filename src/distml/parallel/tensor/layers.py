"""Tensor-parallel layers built from the full layers of a plain model.

Each layer keeps the attribute names of the layer it replaces (``weight``,
``bias``, ``in_features``/``out_features``) so parameter names, and therefore
optimizers and checkpoints, stay those of the plain model; only the shapes
shrink to this rank's shard. ``shard_dims`` records which parameters are split
along which dimension, which is all :mod:`distml.parallel.tensor.state` needs
to reassemble full tensors (layers with another layout override the two
methods of :class:`TensorParallelLayer`).

``sequence_parallel`` switches a layer's collectives to the sequence-parallel
pair (:mod:`.sequence`): the column-parallel entry all-gathers sequence shards
instead of copying, the row-parallel exit and the embedding reduce-scatter onto
sequence shards instead of all-reducing. The sequence is dimension 1 (B, T, C).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distml.parallel.tensor.comm import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_sequence,
)


def shard(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's contiguous equal slice of ``tensor`` along ``dim`` (a fresh copy)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return tensor.detach().chunk(size, dim=dim)[rank].clone()


class TensorParallelLayer(nn.Module):
    """Base of the sharded layers: which parameters are split, and how to (un)split them."""

    group: dist.ProcessGroup
    shard_dims: dict[str, int]

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensor of parameter ``name``."""
        return shard(full, self.shard_dims[name], self.group)

    def full_from_shards(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor of parameter ``name`` from every rank's shard, in rank order."""
        return torch.cat(parts, dim=self.shard_dims[name])


class ColumnParallelLinear(TensorParallelLayer):
    """y_local = x @ W_local^T + b_local: this rank's slice of the output features.

    ``copy_input`` enters the tensor-parallel region here (set it when no
    enclosing module's hook did); ``gather_output`` all-gathers the full
    output (used for logits when the loss is not vocabulary-parallel). With
    ``sequence_parallel`` the entry all-gathers the input's sequence shards.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: dist.ProcessGroup,
        *,
        copy_input: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.group = group
        self.copy_input = copy_input
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.out_features, self.in_features = weight.shape
        self.shard_dims = {"weight": 0, "bias": 0}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: dist.ProcessGroup,
        *,
        copy_input: bool = False,
        gather_output: bool = False,
        weight: nn.Parameter | None = None,
        sequence_parallel: bool = False,
    ) -> ColumnParallelLinear:
        """Shard ``linear`` by output rows; ``weight`` reuses an existing shard (tied weights)."""
        w = weight if weight is not None else nn.Parameter(shard(linear.weight, 0, group))
        b = None if linear.bias is None else nn.Parameter(shard(linear.bias, 0, group))
        return cls(
            w,
            b,
            group,
            copy_input=copy_input,
            gather_output=gather_output,
            sequence_parallel=sequence_parallel,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            if self.sequence_parallel:
                x = gather_from_sequence(x, self.group)
            else:
                x = copy_to_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, local_out_features={self.out_features}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(TensorParallelLayer):
    """y = all_reduce(x_local @ W_local^T) + b: input features split, output replicated.

    With ``sequence_parallel`` the sum is reduce-scattered instead: each rank
    keeps its sequence chunk of y (and adds the replicated bias to it).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: dist.ProcessGroup,
        *,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.out_features, self.in_features = weight.shape
        self.shard_dims = {"weight": 1}

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: dist.ProcessGroup, *, sequence_parallel: bool = False
    ) -> RowParallelLinear:
        w = nn.Parameter(shard(linear.weight, 1, group))
        b = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return cls(w, b, group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the sum, not once per rank.
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(partial, self.group)
        else:
            y = reduce_from_region(partial, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"local_in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(TensorParallelLayer):
    """Embedding whose rows (the vocabulary) are split; ids outside the shard give zeros.

    The partial lookups are summed across ranks, so every rank ends with the
    full embedding of every token while holding 1/tp of the table. With
    ``sequence_parallel`` they are reduce-scattered: each rank ends with the
    full embeddings of its sequence chunk (ids stay whole: (B, T) -> (B, T/tp, C)).
    """

    def __init__(
        self, weight: nn.Parameter, group: dist.ProcessGroup, *, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.weight = weight
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = weight.shape
        self.vocab_start = dist.get_rank(group) * self.num_embeddings
        self.shard_dims = {"weight": 0}

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, group: dist.ProcessGroup, *, sequence_parallel: bool = False
    ) -> VocabParallelEmbedding:
        weight = nn.Parameter(shard(embedding.weight, 0, group))
        return cls(weight, group, sequence_parallel=sequence_parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(rows, self.group)
        return reduce_from_region(rows, self.group)

    def extra_repr(self) -> str:
        return (
            f"local_num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"vocab_start={self.vocab_start}, sequence_parallel={self.sequence_parallel}"
        )
