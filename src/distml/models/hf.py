"""Hugging Face transformers models (GPT-2, BERT) built from a config in the YAML, no downloads.

``hf-gpt2`` (``GPT2LMHeadModel``), ``hf-bert`` (``BertForMaskedLM``) and
``hf-bert-qa`` (``BertForQuestionAnswering``) are built with random weights
from the ``model.args`` below (sizes the dataset fixes, vocabulary and block
size, are filled in as for distml's own models). Each is wrapped in a thin
module whose forward returns a plain logits tensor, so the one training loop,
the losses and generation treat them like distml's models; the Hugging Face
model itself is ``.hf`` (``model.hf.save_pretrained(dir)`` exports it).
transformers is imported only when one of these models is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distml.errors import ConfigError
from distml.models.layers import validate_transformer_sizes
from distml.models.registry import register_model

PAD_LOGIT = -1e4


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need transformers: pip install 'distml[hf]', or use "
            "model.name=gpt / bert"
        ) from None
    return transformers


@dataclass
class HFGPT2Config:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int | None = None
    dropout: float = 0.0
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        validate_transformer_sizes(
            self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd, self.dropout
        )


@dataclass
class HFBertConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int | None = None
    dropout: float = 0.0
    type_vocab_size: int = 2
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        validate_transformer_sizes(
            self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd, self.dropout
        )


class HFCausalLM(nn.Module):
    """ids (B, T) -> logits (B, T, V) of a Hugging Face causal LM (no KV cache)."""

    hf: Any

    def __init__(self, hf: nn.Module, cfg: HFGPT2Config) -> None:
        super().__init__()
        self.hf = hf
        self.config = cfg  # block_size for generation's context crop

    @property
    def blocks(self) -> nn.ModuleList:
        # A view, not a second registration: state_dict keys stay Hugging Face's under "hf.".
        blocks: nn.ModuleList = self.hf.transformer.h
        return blocks

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=idx, use_cache=False).logits
        return logits


class HFMaskedLM(nn.Module):
    """ids (B, T) -> MLM logits (B, T, V) of a Hugging Face BERT."""

    hf: Any

    def __init__(self, hf: nn.Module, cfg: HFBertConfig) -> None:
        super().__init__()
        self.hf = hf
        self.config = cfg

    @property
    def blocks(self) -> nn.ModuleList:
        blocks: nn.ModuleList = self.hf.bert.encoder.layer
        return blocks

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=idx).logits
        return logits


class HFQuestionAnswering(HFMaskedLM):
    """(B, 3, T) ids/types/mask -> (B, 2, T) start/end logits, as distml's ``bert-qa``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if x.dim() == 3:
            ids, types, mask = x.unbind(1)
            out = self.hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        else:
            out = self.hf(input_ids=x)
        logits = torch.stack([out.start_logits, out.end_logits], dim=1)
        if mask is not None:
            logits = logits.masked_fill((mask == 0).unsqueeze(1), PAD_LOGIT)
        return logits


def gpt2_config(cfg: HFGPT2Config) -> Any:
    return _transformers().GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        activation_function=cfg.activation_function,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_cache=False,
    )


def bert_config(cfg: HFBertConfig) -> Any:
    return _transformers().BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.block_size,
        type_vocab_size=cfg.type_vocab_size,
    )


@register_model("hf-gpt2", HFGPT2Config, "causal_lm")
def build_hf_gpt2(cfg: HFGPT2Config) -> HFCausalLM:
    return HFCausalLM(_transformers().GPT2LMHeadModel(gpt2_config(cfg)), cfg)


@register_model("hf-bert", HFBertConfig, "masked_lm")
def build_hf_bert(cfg: HFBertConfig) -> HFMaskedLM:
    return HFMaskedLM(_transformers().BertForMaskedLM(bert_config(cfg)), cfg)


@register_model("hf-bert-qa", HFBertConfig, "extractive_qa")
def build_hf_bert_qa(cfg: HFBertConfig) -> HFQuestionAnswering:
    return HFQuestionAnswering(_transformers().BertForQuestionAnswering(bert_config(cfg)), cfg)
