"""The device mesh that composes data, pipeline and tensor parallelism.

:func:`build_mesh` lays the world out as a 3-D grid with named axes
``("dp", "pp", "tp")`` (tensor-parallel ranks adjacent, data-parallel ranks
farthest apart, as Megatron does: tensor parallelism talks most). Every
technique takes the mesh explicitly and asserts the axes it uses with
:func:`require_axes`; none assumes a 1-D world. :func:`all_reduce_gradients`
averages gradients over one axis (data parallelism on top of the others) and
:func:`clip_grad_norm_` clips by the norm of the whole, distributed gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distml.errors import ConfigError

AXES = ("dp", "pp", "tp")


def check_parallel_dims(dp: int, pp: int, tp: int, world_size: int) -> None:
    """Raise a one-line ConfigError unless dp x pp x tp is a factorisation of the world."""
    for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if value < 1:
            raise ConfigError(f"parallel.{name} must be a positive integer, got {value}")
    if dp * pp * tp != world_size:
        raise ConfigError(
            f"parallel.dp x pp x tp = {dp} x {pp} x {tp} = {dp * pp * tp} does not match "
            f"the world size {world_size}; launch {dp * pp * tp} processes or change the sizes"
        )


def build_mesh(dp: int = 1, pp: int = 1, tp: int = 1, device_type: str = "cpu") -> DeviceMesh:
    """The (dp, pp, tp) mesh over the default process group (which must be initialised)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_parallel_dims(dp, pp, tp, world)
    if world == 1 and not dist.is_initialized():
        raise ConfigError(
            "build_mesh needs an initialised process group; call "
            "torch.distributed.init_process_group (or launch with distml run) first"
        )
    return init_device_mesh(device_type, (dp, pp, tp), mesh_dim_names=AXES)


def require_axes(mesh: DeviceMesh, *axes: str) -> None:
    """Assert that ``mesh`` names every axis in ``axes`` (a technique's precondition)."""
    names = mesh.mesh_dim_names or ()
    missing = [axis for axis in axes if axis not in names]
    if missing:
        raise ValueError(
            f"device mesh with axes {names} lacks {missing}; build it with "
            f"distml.parallel.mesh.build_mesh or name its dimensions {axes}"
        )


def axis_group(mesh: DeviceMesh, axis: str) -> dist.ProcessGroup:
    """The process group of this rank along ``axis``."""
    require_axes(mesh, axis)
    return mesh.get_group(axis)


def axis_size(mesh: DeviceMesh, axis: str) -> int:
    require_axes(mesh, axis)
    return int(mesh[axis].size())


def axis_rank(mesh: DeviceMesh, axis: str) -> int:
    """This rank's coordinate along ``axis``."""
    require_axes(mesh, axis)
    return int(mesh.get_local_rank(axis))


def all_reduce_gradients(module: nn.Module, mesh: DeviceMesh, axis: str = "dp") -> None:
    """Average the gradients of ``module`` over ``axis`` in one flat all-reduce.

    Used after the backward pass when data parallelism is combined with
    pipeline or tensor parallelism: the other axes hold different shards, so
    only the ranks along ``axis`` hold replicas of the same parameters.
    """
    if axis_size(mesh, axis) == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    # One flat buffer per dtype: one collective instead of one per parameter. The
    # dtypes are sorted by name so every rank issues the collectives in one order.
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=axis_group(mesh, axis))
        flat.div_(axis_size(mesh, axis))
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm_(
    module: nn.Module, mesh: DeviceMesh, max_norm: float, *, skip: Iterable[nn.Parameter] = ()
) -> float:
    """Clip gradients by the norm of the whole model's gradient; returns that norm.

    Under tensor and pipeline parallelism each rank holds part of the
    gradient: tensor-parallel shards count on every tp rank, replicated
    parameters once per tp group, and each pipeline stage its own blocks.
    ``skip`` names parameters whose gradient another rank already counts
    (the last stage's copy of a tied embedding, see ``Pipeline.duplicate_parameters``).
    Data-parallel replicas hold equal gradients after averaging, so dp is not summed.
    """
    from distml.parallel.tensor.state import sharded_entries

    sharded = {id(getattr(layer, name)) for layer, name in sharded_entries(module).values()}
    skipped = {id(p) for p in skip}
    names = mesh.mesh_dim_names or ()
    lead_of_tp = "tp" not in names or axis_rank(mesh, "tp") == 0
    counted = [
        p.grad
        for p in module.parameters()
        if p.grad is not None and id(p) not in skipped and (id(p) in sharded or lead_of_tp)
    ]
    total = torch.zeros((), dtype=torch.float64)
    for g in counted:
        total += g.detach().double().pow(2).sum().cpu()
    for axis in ("tp", "pp"):
        if axis in names and axis_size(mesh, axis) > 1:
            dist.all_reduce(total, group=axis_group(mesh, axis))
    norm = float(total.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        # Skipped copies must take the same scale as the counted ones they mirror.
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
