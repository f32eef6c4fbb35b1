"""Pipeline stage plans for Hugging Face GPT-2 and BERT models built from a config.

:class:`~distml.models.hf.HFCausalLM` (``hf-gpt2``) and
:class:`~distml.models.hf.HFMaskedLM` (``hf-bert``) wrap a transformers model
under ``hf.``; their stages keep transformers' own submodules and state-dict
keys (``hf.transformer.h.3.attn...``), so checkpoints merge by key exactly as
for distml's models. Each stage rebuilds what transformers' model forward
passes its blocks: GPT-2 blocks get the causal mask from transformers'
``create_causal_mask`` (for the SDPA attention this is ``None`` and the
kernel applies causality itself), BERT layers run unmasked (no padding in
the masked-LM batches). Tied input/output embeddings are summed between the
first and last stage like distml's. ``hf-bert-qa`` has no plan (its input
carries token types and a mask that would have to travel with the
activations).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distml.models.layers import check_sequence_length


def _gpt2_embed(stage: Any, idx: torch.Tensor) -> torch.Tensor:
    tr = stage.hf.transformer
    check_sequence_length(idx.shape[1], tr.wpe.num_embeddings)
    pos = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
    out: torch.Tensor = tr.drop(tr.wte(idx) + tr.wpe(pos))
    return out


def _gpt2_head(stage: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = stage.hf.lm_head(stage.hf.transformer.ln_f(x))
    return out


def _gpt2_runner(config: Any) -> Any:
    from transformers.masking_utils import create_causal_mask

    def run(stage: Any, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        mask = create_causal_mask(
            config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
        )
        for block in blocks:
            x = block(x, None, mask, position_ids=pos)
        return x

    return run


def _bert_embed(stage: Any, idx: torch.Tensor) -> torch.Tensor:
    emb = stage.hf.bert.embeddings
    check_sequence_length(idx.shape[1], emb.position_embeddings.num_embeddings)
    out: torch.Tensor = emb(input_ids=idx)
    return out


def _bert_head(stage: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = stage.hf.cls(x)
    return out


def _bert_run(stage: Any, blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in blocks:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out
    return x


def hf_model_parts(model: nn.Module) -> Any:
    """The :class:`ModelParts` of a Hugging Face GPT-2 / BERT masked LM, else None."""
    from distml.parallel.pipeline.stage import ModelParts
    from distml.parallel.tensor.hf_bert import is_hf_bert
    from distml.parallel.tensor.hf_gpt2 import is_hf_gpt2

    hf: Any = getattr(model, "hf", None)
    kind = type(hf).__name__ if isinstance(hf, nn.Module) else None
    if kind == "GPT2LMHeadModel" and is_hf_gpt2(model):
        tied = hf.lm_head.weight is hf.transformer.wte.weight
        return ModelParts(
            ("hf.transformer.wte", "hf.transformer.wpe", "hf.transformer.drop"),
            ("hf.transformer.ln_f", "hf.lm_head"),
            _gpt2_embed,
            _gpt2_head,
            (("hf.transformer.wte.weight", "hf.lm_head.weight"),) if tied else (),
            blocks_name="hf.transformer.h",
            run_blocks=_gpt2_runner(hf.config),
        )
    if kind == "BertForMaskedLM" and is_hf_bert(model):
        decoder = hf.cls.predictions.decoder
        tied = decoder.weight is hf.bert.embeddings.word_embeddings.weight
        return ModelParts(
            ("hf.bert.embeddings",),
            ("hf.cls",),
            _bert_embed,
            _bert_head,
            (("hf.bert.embeddings.word_embeddings.weight", "hf.cls.predictions.decoder.weight"),)
            if tied
            else (),
            blocks_name="hf.bert.encoder.layer",
            run_blocks=_bert_run,
        )
    return None
