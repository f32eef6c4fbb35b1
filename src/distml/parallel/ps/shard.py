"""One server's shard: its chunks as views of a flat buffer, and their optimizer.

The shard keeps parameters in one contiguous buffer (what is sent on a pull)
and exposes each chunk as an ``nn.Parameter`` view of it, so a stock torch
optimizer of the trainer's class and hyperparameters updates the buffer in
place. Shard state is exported chunk by chunk for checkpoints and can be
assembled into, and sliced back out of, a whole-model form that does not
depend on the number of servers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distml.parallel.ps.sharding import Chunk, ShardPlan

#: Optimizers whose update of an element depends only on that element's history:
#: their parameters may be cut into chunks. Others (LARS, LAMB) get whole tensors.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)


def is_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in ELEMENTWISE_OPTIMIZERS


def clone_optimizer(
    template: torch.optim.Optimizer, groups: Sequence[Sequence[torch.Tensor]]
) -> torch.optim.Optimizer:
    """An optimizer of ``template``'s class and per-group hyperparameters over new tensors.

    ``groups[i]`` replaces the parameters of ``template.param_groups[i]``; empty
    groups are dropped.
    """
    cls = type(template)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in template.defaults.items() if k in accepted and k != "params"}
    new_groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": list(params)}
        for group, params in zip(template.param_groups, groups, strict=True)
        if params
    ]
    return cls(new_groups, **kwargs)


class Shard:
    """Chunks of one server as views of ``flat``, with a shard-local optimizer."""

    def __init__(
        self,
        plan: ShardPlan,
        server: int,
        params: Sequence[torch.Tensor],
        template: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        self.chunks: list[Chunk] = plan.server_chunks(server)
        if not self.chunks:
            raise ValueError(f"server {server} owns no chunk")
        dtype = params[self.chunks[0].index].dtype
        self.numel = sum(c.numel for c in self.chunks)
        self.flat = torch.empty(self.numel, dtype=dtype, device=device)
        self.grad_flat = torch.zeros_like(self.flat)
        self.params: list[nn.Parameter] = []
        offset = 0
        with torch.no_grad():
            for chunk in self.chunks:
                source = params[chunk.index].detach().reshape(-1)[chunk.start : chunk.stop]
                self.flat[offset : offset + chunk.numel].copy_(source)
                view = self.flat[offset : offset + chunk.numel].view(chunk.shape)
                param = nn.Parameter(view)
                param.grad = self.grad_flat[offset : offset + chunk.numel].view(chunk.shape)
                self.params.append(param)
                offset += chunk.numel
        # Chunks join the template's group of the parameter they come from.
        group_of = {
            id(p): g for g, group in enumerate(template.param_groups) for p in group["params"]
        }
        self.group_index: list[int] = []
        groups: list[list[torch.Tensor]] = [[] for _ in template.param_groups]
        for chunk, param in zip(self.chunks, self.params, strict=True):
            g = group_of[id(params[chunk.index])]
            groups[g].append(param)
        self.group_index = [g for g, members in enumerate(groups) if members]
        self.optimizer = clone_optimizer(template, groups)

    @torch.no_grad()
    def apply(self, grad: torch.Tensor, lrs: Sequence[float]) -> None:
        """One optimizer step with ``grad`` (flat, shard-sized) at the template groups' ``lrs``."""
        self.grad_flat.copy_(grad)
        for group, g in zip(self.optimizer.param_groups, self.group_index, strict=True):
            group["lr"] = lrs[g]
        self.optimizer.step()

    # -------------------------------------------------------------- state
    def export_state(self) -> dict[str, torch.Tensor]:
        """Chunk values and optimizer state as named tensors (copies, on CPU)."""
        out: dict[str, torch.Tensor] = {}
        for chunk, param in zip(self.chunks, self.params, strict=True):
            out[f"param/{chunk.key}"] = param.detach().cpu().clone()
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"state/{chunk.key}/{key}"] = value.detach().cpu().clone()
                elif isinstance(value, (int, float, bool)):
                    out[f"state/{chunk.key}/{key}"] = torch.tensor(value)
        return out

    @torch.no_grad()
    def load_full(self, full: Mapping[str, Any]) -> None:
        """Take this shard's slices from a whole-model state (see :func:`assemble_full`)."""
        params: Mapping[str, torch.Tensor] = full["params"]
        states: Mapping[str, Mapping[str, torch.Tensor]] = full.get("optimizer_state", {})
        for chunk, param in zip(self.chunks, self.params, strict=True):
            whole = params[chunk.name]
            param.copy_(whole.reshape(-1)[chunk.start : chunk.stop].view(chunk.shape))
            state: dict[str, torch.Tensor] = {}
            for key, value in states.get(chunk.name, {}).items():
                if value.shape == whole.shape:
                    piece = value.reshape(-1)[chunk.start : chunk.stop].view(chunk.shape)
                    state[key] = piece.to(param.device).clone()
                else:
                    state[key] = value.clone()  # scalars (e.g. Adam's step) stay where saved
            if state:
                self.optimizer.state[param] = state


def assemble_full(
    plan: ShardPlan,
    shard_states: Sequence[Mapping[str, torch.Tensor]],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, Any]:
    """Whole-model parameters and optimizer state from every server's exported state.

    A state tensor shaped like its chunk is per-element (momentum, Adam moments) and
    is stitched into a parameter-shaped tensor; any other (Adam's step) is kept as is.
    """
    params = {n: torch.zeros(shapes[n], dtype=dtypes[n]) for n in shapes}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for chunk in plan.chunks:
        exported = shard_states[chunk.server]
        piece = exported[f"param/{chunk.key}"].reshape(-1)
        params[chunk.name].view(-1)[chunk.start : chunk.stop] = piece
        prefix = f"state/{chunk.key}/"
        per_param = states.setdefault(chunk.name, {})
        for name, value in exported.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix) :]
            if value.shape == chunk.shape:
                if key not in per_param:
                    per_param[key] = torch.zeros(shapes[chunk.name], dtype=value.dtype)
                per_param[key].view(-1)[chunk.start : chunk.stop] = value.reshape(-1)
            else:
                per_param.setdefault(key, value)
    return {"params": params, "optimizer_state": {k: v for k, v in states.items() if v}}
