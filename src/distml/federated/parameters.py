"""Model parameters as the flat, ordered list of tensors that federated code exchanges.

``Parameters`` is ``list[torch.Tensor]`` in the order of the module's
``state_dict`` (parameters and buffers), so a server, a client and a
simulation agree on what the i-th tensor is without sending names. The
helpers here move that list in and out of an ``nn.Module``, turn it into one
flat vector (for geometric rules such as Krum and for secure aggregation) and
into safetensors bytes for a transport, which never needs pickle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from distml.errors import UserError

Parameters = list[torch.Tensor]


def parameter_names(module: nn.Module) -> list[str]:
    """The ``state_dict`` keys of ``module``: the fixed order of its :data:`Parameters`."""
    return list(module.state_dict().keys())


def get_parameters(module: nn.Module) -> Parameters:
    """Detached copies of ``module``'s state in ``state_dict`` order."""
    return [t.detach().clone() for t in module.state_dict().values()]


def set_parameters(module: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Load ``params`` (in :func:`parameter_names` order) into ``module`` in place."""
    names = parameter_names(module)
    if len(params) != len(names):
        raise UserError(
            f"got {len(params)} tensors for a model with {len(names)} state entries; "
            f"send parameters produced by get_parameters() of the same model"
        )
    current = module.state_dict()
    for name, tensor in zip(names, params, strict=True):
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise UserError(
                f"parameter {name!r} has shape {tuple(tensor.shape)}, model expects "
                f"{tuple(current[name].shape)}; use parameters of the same model architecture"
            )
    module.load_state_dict(dict(zip(names, params, strict=True)))


def clone_parameters(params: Sequence[torch.Tensor]) -> Parameters:
    return [t.detach().clone() for t in params]


def subtract(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Parameters:
    """``a - b`` tensor by tensor, in floating point (integer buffers become float)."""
    return [x.to(_float_dtype(x)) - y.to(_float_dtype(x)) for x, y in zip(a, b, strict=True)]


def add_update(base: Sequence[torch.Tensor], update: Sequence[torch.Tensor]) -> Parameters:
    """``base + update`` cast back to each tensor's dtype (integer buffers are rounded)."""
    out: Parameters = []
    for b, u in zip(base, update, strict=True):
        total = b.to(u.dtype) + u
        out.append(total if b.is_floating_point() else torch.round(total).to(b.dtype))
    return out


def flatten(params: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All tensors concatenated into one 1-D vector of ``dtype``."""
    if not params:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([t.reshape(-1).to(dtype) for t in params])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> Parameters:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like ``like``."""
    sizes = [t.numel() for t in like]
    if vector.numel() != sum(sizes):
        raise ValueError(f"vector has {vector.numel()} entries, expected {sum(sizes)}")
    parts = torch.split(vector, sizes)
    return [p.reshape(t.shape).to(_float_dtype(t)) for p, t in zip(parts, like, strict=True)]


def num_bytes(params: Sequence[torch.Tensor]) -> int:
    """Payload size of ``params`` as raw tensor bytes (what a transport must move)."""
    return sum(t.numel() * t.element_size() for t in params)


def parameters_to_bytes(params: Sequence[torch.Tensor]) -> bytes:
    """Serialize with safetensors (keys ``"0"``, ``"1"``, ...): safe to load from anyone."""
    return st_save({str(i): t.detach().contiguous().cpu() for i, t in enumerate(params)})


def parameters_from_bytes(data: bytes) -> Parameters:
    """Inverse of :func:`parameters_to_bytes`."""
    tensors = st_load(data)
    try:
        return [tensors[str(i)] for i in range(len(tensors))]
    except KeyError:
        raise UserError(
            "parameter payload keys are not 0..n-1; encode it with parameters_to_bytes()"
        ) from None


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32
