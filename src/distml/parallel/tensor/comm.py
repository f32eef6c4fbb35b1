"""Communication primitives of tensor parallelism, as autograd functions.

Megatron's conjugate pair: :func:`copy_to_region` is the identity forward and
an all-reduce backward (entering a column-parallel region, every rank's
partial input gradient must be summed); :func:`reduce_from_region` is an
all-reduce forward and the identity backward (leaving a row-parallel region).
:func:`gather_from_region` concatenates last-dimension shards forward and
keeps this rank's slice backward. Explicit functions rather than DTensor keep
the collectives visible and give exact gradients on gloo.

Sequence parallelism (:mod:`.sequence`) replaces the pair by a second one over
the sequence dimension: :func:`gather_from_sequence` (all-gather forward,
reduce-scatter backward) enters a column-parallel region from sequence shards,
:func:`reduce_scatter_to_sequence` (reduce-scatter forward, all-gather
backward) leaves a row-parallel region onto sequence shards. Same bytes as one
all-reduce per pair, but the activations outside the regions are 1/tp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distml.errors import ConfigError


def _world(group: dist.ProcessGroup) -> int:
    return int(dist.get_world_size(group))


def native_reduce_scatter(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether to use the backend's reduce-scatter (NCCL) rather than all-reduce + slice.

    Decided by backend name and tensor device, so every rank of the group takes
    the same path (a try/except probe could diverge between ranks and hang).
    Gloo has no reduce-scatter in older torch releases: CPU tensors, and any
    backend but NCCL, take the fallback.
    """
    return device.type == "cuda" and "nccl" in str(dist.get_backend(group))


# Newer torch names it reduce_scatter_single (reduce_scatter_tensor warns); same semantics.
_reduce_scatter_single: Any = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


def _check_divisible(length: int, size: int) -> None:
    if length % size:
        raise ConfigError(sequence_length_message(length, size))


def sequence_length_message(length: int, tp: int) -> str:
    """The one-line error for a sequence that does not split evenly over the tp ranks."""
    return (
        f"parallel.sequence_parallel splits the sequence over parallel.tp={tp} ranks, but "
        f"the sequence length {length} (data.seq_len) is not divisible by {tp}; set "
        f"data.seq_len to a multiple of {tp}"
    )


def all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's shard of ``x`` along ``dim`` (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    # all_gather into a list works on every backend; cat restores the (B, T, C) layout.
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's equal chunk along ``dim`` (no autograd)."""
    size, rank = _world(group), dist.get_rank(group)
    _check_divisible(x.shape[dim], size)
    chunk = x.shape[dim] // size
    if native_reduce_scatter(group, x.device):
        # The collective scatters along dim 0: stack the chunks there, rank order.
        stacked = torch.stack(x.chunk(size, dim=dim)).contiguous()
        out = torch.empty_like(stacked[:1])
        _reduce_scatter_single(out, stacked, group=group)
        return out[0]
    # Fallback (gloo): all-reduce then slice. Same result and the same math, but it
    # moves the whole tensor, so on gloo it saves no bandwidth over plain TP.
    full = x.contiguous().clone()
    dist.all_reduce(full, group=group)
    return full.narrow(dim, rank * chunk, chunk).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Clone: autograd may hand the same buffer to other consumers of grad.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.width = x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return all_gather_sequence(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Each rank's column-parallel layers give a partial gradient of the full
        # sequence: sum them and keep this rank's positions.
        return reduce_scatter_sequence(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_sequence(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # The gradient of every rank's partial sum is the gradient of the full sum.
        return all_gather_sequence(grad, ctx.group, ctx.dim), None, None


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward, all-reduce (sum) of the gradient backward."""
    if _world(group) == 1:
        return x
    out: torch.Tensor = _CopyToRegion.apply(x, group)
    return out


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward."""
    if _world(group) == 1:
        return x
    out: torch.Tensor = _ReduceFromRegion.apply(x, group)
    return out


def gather_from_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' last-dimension shards forward; this rank's slice backward."""
    if _world(group) == 1:
        return x
    out: torch.Tensor = _GatherFromRegion.apply(x, group)
    return out


def gather_from_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """All-gather sequence shards along ``dim`` forward; reduce-scatter the gradient backward."""
    if _world(group) == 1:
        return x
    out: torch.Tensor = _GatherFromSequence.apply(x, group, dim)
    return out


def reduce_scatter_to_sequence(
    x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1
) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk forward; all-gather backward."""
    if _world(group) == 1:
        return x
    out: torch.Tensor = _ReduceScatterToSequence.apply(x, group, dim)
    return out
