"""Full and sharded state dicts of a tensor-parallel model (for checkpoints).

A tensor-parallel model's ``state_dict()`` holds this rank's shards under the
plain model's names. :func:`full_state_dict` all-gathers them into the state
dict of the unsharded model (what a single-process run would save), and
:func:`load_full_state_dict` takes such a dict and keeps this rank's slices,
so checkpoints stay interchangeable between tp sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distml.parallel.tensor.layers import TensorParallelLayer


def sharded_entries(model: nn.Module) -> dict[str, tuple[TensorParallelLayer, str]]:
    """State-dict key -> (owning layer, parameter name) for every sharded tensor."""
    out: dict[str, tuple[TensorParallelLayer, str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, TensorParallelLayer):
            for name in module.shard_dims:
                if getattr(module, name, None) is not None:
                    out[f"{prefix}.{name}" if prefix else name] = (module, name)
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective: every rank of every tp group must call)."""
    sharded = sharded_entries(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key not in sharded:
            state[key] = value.detach().clone()
            continue
        layer, name = sharded[key]
        parts = [torch.empty_like(value) for _ in range(dist.get_world_size(layer.group))]
        dist.all_gather(parts, value.detach().contiguous(), group=layer.group)
        state[key] = layer.full_from_shards(name, parts)
    return state


def shard_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slices of an unsharded state dict, keyed like ``model.state_dict()``."""
    sharded = sharded_entries(model)
    out: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        if key in sharded:
            layer, name = sharded[key]
            out[key] = layer.shard_of_full(name, full[key])
        else:
            out[key] = full[key]
    return out


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a tensor-parallel model (no communication)."""
    model.load_state_dict(shard_state_dict(model, full))
