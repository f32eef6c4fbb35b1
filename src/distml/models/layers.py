"""Transformer building blocks shared by the GPT and BERT models.

Attention keeps separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears and
derives its head count from ``q_proj.out_features`` at run time, so a tensor-
parallel plan can shard q/k/v column-wise by whole heads (and ``o_proj``
row-wise) without touching this code. Only torch and distml.errors are imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distml.errors import ConfigError


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, T, C) via ``F.scaled_dot_product_attention``."""

    def __init__(
        self, n_embd: int, n_head: int, *, causal: bool, bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.o_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: optional bool mask broadcastable to (B, H, T, T), True = may attend."""
        b, t, _ = x.shape
        # -1 instead of n_head: under tensor parallelism this rank holds only some heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.resid_drop(self.o_proj(y))

    @property
    def num_local_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim


class MLP(nn.Module):
    """Position-wise feed-forward: fc (C -> 4C), GELU, proj (4C -> C), dropout."""

    def __init__(self, n_embd: int, *, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


def init_transformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT init: N(0, std) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_sequence_length(t: int, block_size: int) -> None:
    if t > block_size:
        raise ValueError(
            f"sequence length {t} exceeds block_size {block_size}; "
            f"crop the input to its last {block_size} tokens or build the model "
            f"with a larger block_size"
        )


def validate_transformer_sizes(
    vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float
) -> None:
    sizes = {
        "vocab_size": vocab_size,
        "block_size": block_size,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
    }
    for key, value in sizes.items():
        if value < 1:
            raise ConfigError(f"model.args.{key} must be a positive integer, got {value}")
    if n_embd % n_head:
        raise ConfigError(
            f"model.args.n_embd ({n_embd}) must be divisible by model.args.n_head ({n_head}); "
            "pick n_embd as a multiple of n_head"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.args.dropout must be in [0, 1), got {dropout}")
