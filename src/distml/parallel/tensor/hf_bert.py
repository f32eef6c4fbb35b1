"""Tensor-parallel plan for Hugging Face BERT (``BertModel``, ``BertForMaskedLM``,
``BertForQuestionAnswering``, or distml's ``hf-*`` wrappers around them).

Megatron layout on Hugging Face's module names: per encoder layer, query/key/
value are column-parallel by whole heads and ``attention.output.dense`` is
row-parallel (one all-reduce), ``intermediate.dense`` column-parallel and
``output.dense`` row-parallel (one all-reduce); LayerNorms, dropout and the
residual adds stay replicated. The word embedding is split by vocabulary rows
and the tied MLM decoder by vocabulary columns (gathered unless
``loss_parallel``). The attention reads its local head count from the
projection width (``view(..., -1, head_size)`` in transformers 5), and
``num_attention_heads``/``all_head_size`` are set to the local values for
older versions. transformers is not imported: the model is recognised by its
class name. The MLM head's ``cls.predictions.bias`` alias of the decoder bias is
dropped, so full state dicts hold it once, as ``cls.predictions.decoder.bias``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import ConfigError
from distml.parallel.tensor.hf_gpt2 import _enter_region_hf
from distml.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

_HF_CLASSES = ("BertModel", "BertForMaskedLM", "BertForQuestionAnswering")


def _hf_module(model: nn.Module) -> nn.Module:
    inner = getattr(model, "hf", None)
    return inner if isinstance(inner, nn.Module) else model


def is_hf_bert(model: nn.Module) -> bool:
    cls = type(_hf_module(model))
    return cls.__name__ in _HF_CLASSES and cls.__module__.startswith("transformers.")


def _no_grad_at_padding(
    padding_idx: int, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor
) -> torch.Tensor:
    # nn.Embedding(padding_idx=...) gives the padding row no gradient from lookups; the
    # sharded lookup does not know it, so the padding positions' rows are cut off here.
    pad = (args[0] == padding_idx).unsqueeze(-1)
    return torch.where(pad, out.detach(), out)


def parallelize_hf_bert(model: nn.Module, group: dist.ProcessGroup, loss_parallel: bool) -> None:
    """Shard a Hugging Face BERT in place (see the module docstring)."""
    from distml.parallel.tensor.plan import check_tensor_parallel_sizes

    hf: Any = _hf_module(model)
    tp = dist.get_world_size(group)
    cfg: Any = hf.config
    check_tensor_parallel_sizes(tp, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size)
    if cfg.intermediate_size % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the MLP width {cfg.intermediate_size} "
            "(intermediate_size); choose a tp that divides it"
        )
    body: Any = hf.bert if hasattr(hf, "bert") else hf
    for layer in body.encoder.layer:
        sa = layer.attention.self
        sa.query = ColumnParallelLinear.from_linear(sa.query, group)
        sa.key = ColumnParallelLinear.from_linear(sa.key, group)
        sa.value = ColumnParallelLinear.from_linear(sa.value, group)
        sa.num_attention_heads = cfg.num_attention_heads // tp
        sa.all_head_size = cfg.hidden_size // tp
        # One entry into the region for q, k and v together: one backward all-reduce.
        sa.register_forward_pre_hook(functools.partial(_enter_region_hf, group), with_kwargs=True)
        layer.attention.output.dense = RowParallelLinear.from_linear(
            layer.attention.output.dense, group
        )
        layer.intermediate.dense = ColumnParallelLinear.from_linear(
            layer.intermediate.dense, group, copy_input=True
        )
        layer.output.dense = RowParallelLinear.from_linear(layer.output.dense, group)
    emb = body.embeddings
    predictions = getattr(getattr(hf, "cls", None), "predictions", None)
    tok = VocabParallelEmbedding.from_embedding(emb.word_embeddings, group)
    if emb.word_embeddings.padding_idx is not None:
        tok.register_forward_hook(
            functools.partial(_no_grad_at_padding, emb.word_embeddings.padding_idx)
        )
    if predictions is not None:
        decoder = predictions.decoder
        tied = decoder.weight is emb.word_embeddings.weight
        bias_tied = decoder.bias is not None and decoder.bias is getattr(predictions, "bias", None)
        predictions.decoder = ColumnParallelLinear.from_linear(
            decoder,
            group,
            copy_input=True,
            gather_output=not loss_parallel,
            weight=tok.weight if tied else None,
        )
        if bias_tied:
            # predictions.bias aliased decoder.bias; keeping the alias would store a shard
            # under an unsharded name, so the decoder's (sharded) bias is the only copy.
            del predictions.bias
            predictions.register_parameter("bias", None)
    emb.word_embeddings = tok
