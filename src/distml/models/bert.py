"""A BERT-style bidirectional encoder with a masked-language-model head.

Embeddings (token + position + token type, LayerNorm, dropout), a stack of
post-LN encoder layers (``blocks``) with the same q/k/v/o and fc/proj naming as
GPT so the same tensor-parallel plan applies, and an MLM head whose decoder is
tied to the token embedding. :meth:`BERT.encode` exposes the hidden states for
other task heads (classification, extractive QA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distml.errors import ConfigError
from distml.models.layers import (
    MLP,
    SelfAttention,
    check_sequence_length,
    init_transformer_weights,
    validate_transformer_sizes,
)
from distml.models.registry import register_model


@dataclass
class BERTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    type_vocab_size: int = 2

    def __post_init__(self) -> None:
        validate_transformer_sizes(
            self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd, self.dropout
        )
        if self.type_vocab_size < 1:
            raise ConfigError(
                f"model.args.type_vocab_size must be a positive integer, got {self.type_vocab_size}"
            )


class Embeddings(nn.Module):
    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.ln(self.tok(idx) + self.pos(pos) + self.token_type(token_type_ids)))


class EncoderLayer(nn.Module):
    """Post-LN encoder layer: ln_1(x + attn(x)), then ln_2(x + mlp(x))."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, causal=False, dropout=cfg.dropout)
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, dropout=cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, attn_mask))
        return self.ln_2(x + self.mlp(x))


class MLMHead(nn.Module):
    """dense-GELU-LayerNorm, then a decoder whose weight is the token embedding."""

    def __init__(self, cfg: BERTConfig, tok_emb: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.decoder.weight = tok_emb.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(self.act(self.dense(h))))


class BERT(nn.Module):
    """idx (B, T) -> MLM logits (B, T, vocab_size); ``encode`` gives (B, T, n_embd)."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.head = MLMHead(cfg, self.embeddings.tok)
        self.apply(init_transformer_weights)

    def encode(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, n_embd). ``attention_mask``: (B, T), 1 = token, 0 = pad."""
        b, t = idx.shape
        check_sequence_length(t, self.config.block_size)
        for name, ids in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if ids is not None and tuple(ids.shape) != (b, t):
                raise ValueError(
                    f"{name} must have the shape of idx {(b, t)}, got {tuple(ids.shape)}"
                )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        mask = None
        if attention_mask is not None:
            # Mask keys only: every query still sees the real tokens, so pad rows stay finite.
            mask = (attention_mask != 0).view(b, 1, 1, t)
        x = self.embeddings(idx, token_type_ids)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.encode(idx, attention_mask, token_type_ids))


@register_model("bert", BERTConfig, "masked_lm")
def build_bert(cfg: BERTConfig) -> BERT:
    return BERT(cfg)
