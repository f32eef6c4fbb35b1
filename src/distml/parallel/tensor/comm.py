"""Communication primitives of tensor parallelism, as autograd functions.

Megatron's conjugate pair: :func:`copy_to_region` is the identity forward and
an all-reduce backward (entering a column-parallel region, every rank's
partial input gradient must be summed); :func:`reduce_from_region` is an
all-reduce forward and the identity backward (leaving a row-parallel region).
:func:`gather_from_region` concatenates last-dimension shards forward and
keeps this rank's slice backward. Explicit functions rather than DTensor keep
the collectives visible and give exact gradients on gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _world(group: dist.ProcessGroup) -> int:
    return int(dist.get_world_size(group))


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
