"""Tensor-parallel plan for Hugging Face GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``).

The same Megatron layout as distml's GPT, adapted to Hugging Face's modules:
``Conv1D`` layers store weights as (in, out), and ``attn.c_attn`` fuses q, k
and v into one (C, 3C) matrix, so each rank keeps its heads' columns of each
third. The attention's ``num_heads`` and ``split_size`` are set to the local
values, which both the older (``_split_heads``) and newer (``view(..., -1,
head_dim)``) GPT-2 forward passes read. Parameter names and the (in, out)
layout are kept, so :func:`~distml.parallel.tensor.state.full_state_dict`
yields a checkpoint Hugging Face can load. transformers is not imported here:
the model is recognised by its class name, also inside distml's ``hf-gpt2``
wrapper (whose ``.hf`` is the GPT-2).

With ``loss_parallel`` the model's logits are vocabulary shards: do not pass
``labels`` (Hugging Face's loss would treat the shard as the full vocabulary);
shift the targets yourself and use :func:`~distml.parallel.tensor.plan.tensor_parallel_loss`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import ConfigError
from distml.parallel.tensor.comm import copy_to_region, reduce_from_region
from distml.parallel.tensor.layers import (
    ColumnParallelLinear,
    TensorParallelLayer,
    VocabParallelEmbedding,
)

_HF_CLASSES = ("GPT2LMHeadModel", "GPT2Model")


def _hf_module(model: nn.Module) -> nn.Module:
    """The Hugging Face model itself, also inside distml's ``hf-gpt2`` wrapper (``.hf``)."""
    inner = getattr(model, "hf", None)
    return inner if isinstance(inner, nn.Module) else model


def is_hf_gpt2(model: nn.Module) -> bool:
    cls = type(_hf_module(model))
    return cls.__name__ in _HF_CLASSES and cls.__module__.startswith("transformers.")


def _take(t: torch.Tensor, dim: int, parts: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of each of ``parts`` equal blocks of ``t`` along ``dim``, concatenated."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = t.detach().chunk(parts, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).clone()


class Conv1DColumnParallel(TensorParallelLayer):
    """A Conv1D (y = x W + b, W (in, out)) keeping this rank's output columns of each block.

    ``parts=3`` is the fused q/k/v projection: columns [q | k | v], each split by heads.
    """

    def __init__(self, conv: Any, group: dist.ProcessGroup, parts: int = 1) -> None:
        super().__init__()
        self.group = group
        self.parts = parts
        self.shard_dims = {"weight": 1, "bias": 0}
        self.weight = nn.Parameter(_take(conv.weight, 1, parts, group))
        self.bias = nn.Parameter(_take(conv.bias, 0, parts, group))
        self.nx, self.nf = self.weight.shape

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _take(full, self.shard_dims[name], self.parts, self.group)

    def full_from_shards(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        dim = self.shard_dims[name]
        pieces = [p.chunk(self.parts, dim=dim) for p in parts]
        return torch.cat([piece[i] for i in range(self.parts) for piece in pieces], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight)
        return y.view(*x.shape[:-1], self.nf)


class Conv1DRowParallel(TensorParallelLayer):
    """A Conv1D with its input rows split: all-reduce of the partial products, then the bias."""

    def __init__(self, conv: Any, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.shard_dims = {"weight": 0}
        self.weight = nn.Parameter(_take(conv.weight, 0, 1, group))
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.nx, self.nf = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.reshape(-1, self.nx) @ self.weight).view(*x.shape[:-1], self.nf)
        return reduce_from_region(y, self.group) + self.bias


def _enter_region_hf(
    group: dist.ProcessGroup, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (copy_to_region(args[0], group), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": copy_to_region(kwargs["hidden_states"], group)}


def parallelize_hf_gpt2(model: nn.Module, group: dist.ProcessGroup, loss_parallel: bool) -> None:
    """Shard a Hugging Face GPT-2 in place (see the module docstring)."""
    from distml.parallel.tensor.plan import check_tensor_parallel_sizes

    model = _hf_module(model)
    tp = dist.get_world_size(group)
    cfg: Any = model.config
    check_tensor_parallel_sizes(tp, cfg.n_head, cfg.n_embd, cfg.vocab_size)
    body: Any = model.transformer if hasattr(model, "transformer") else model
    hook = functools.partial(_enter_region_hf, group)
    for block in body.h:
        attn, mlp = block.attn, block.mlp
        if mlp.c_fc.weight.shape[1] % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide the MLP width {mlp.c_fc.weight.shape[1]} "
                "(n_inner); choose a tp that divides it"
            )
        attn.c_attn = Conv1DColumnParallel(attn.c_attn, group, parts=3)
        attn.c_proj = Conv1DRowParallel(attn.c_proj, group)
        attn.num_heads = cfg.n_head // tp
        attn.split_size = cfg.n_embd // tp
        attn.register_forward_pre_hook(hook, with_kwargs=True)
        mlp.c_fc = Conv1DColumnParallel(mlp.c_fc, group)
        mlp.c_proj = Conv1DRowParallel(mlp.c_proj, group)
        mlp.register_forward_pre_hook(hook, with_kwargs=True)
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and lm_head.weight is body.wte.weight
    wte = VocabParallelEmbedding.from_embedding(body.wte, group)
    if lm_head is not None:
        model.lm_head = ColumnParallelLinear.from_linear(
            lm_head,
            group,
            copy_input=True,
            gather_output=not loss_parallel,
            weight=wte.weight if tied else None,
        )
    body.wte = wte
