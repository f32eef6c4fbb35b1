"""Key/value cache for decoding distml's GPT: one new token per row per step instead of the window.

Without a cache every generated token re-runs the whole context (cost grows
with the context, and on a CPU a 1-row step is already compute-bound, which
also caps what batching can win). :class:`KVCacheDecoder` keeps each layer's
keys and values for a batch of rows. The first call for a set of rows
(*prefill*) runs the right-padded prompts once, causally, and stores their
keys and values; each later call appends exactly one token per row, written
at that row's own position (rows have different lengths), and attends over
that row's cached positions only (a per-row mask), so a row's logits equal a
full forward of its tokens. Rows may leave between calls (finished requests);
they are dropped from the cache. When any row would outgrow the model's
``block_size`` the cache cannot continue (learned absolute positions shift
when the context is cropped): :meth:`KVCacheDecoder.logits` returns None and
the caller falls back to recomputing the cropped window.

Only a plain, single-process :class:`~distml.models.gpt.GPT` is supported
(:func:`supports_kv_cache`); tensor- or pipeline-parallel and Hugging Face
models decode by recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distml.models.gpt import GPT


def supports_kv_cache(model: Any) -> bool:
    """A whole distml GPT in one process (not sharded, not wrapped)."""
    return isinstance(model, GPT) and getattr(model, "tensor_parallel", None) is None


class KVCacheDecoder:
    """Incremental next-token logits for a batch of rows identified by caller-chosen keys."""

    def __init__(self, model: nn.Module) -> None:
        if not supports_kv_cache(model):
            raise ValueError("KVCacheDecoder needs a plain single-process distml GPT")
        # Any: the blocks' submodules are read by name (ln_1, attn.q_proj, ...).
        gpt: Any = model
        self.model = gpt
        self.block_size = int(gpt.config.block_size)
        self.keys: list[int] = []
        self.lengths = torch.zeros(0, dtype=torch.long)
        # Per layer: (keys, values), each (B, H, block_size, head_dim).
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset(self) -> None:
        self.keys, self.cache = [], []
        self.lengths = torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def logits(self, keys: Sequence[int], seqs: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """(B, V) float logits after each row's last token, or None if a row outgrew the block.

        ``keys[i]`` names row ``i`` across calls; ``seqs[i]`` is its whole token list.
        """
        if any(len(s) > self.block_size for s in seqs):
            self.reset()
            return None
        device = self._device()
        if self._extends_cache(keys, seqs):
            rows = torch.tensor([self.keys.index(k) for k in keys], device=device)
            if len(keys) != len(self.keys):
                self._keep(rows)
            self.keys = list(keys)
            last = torch.tensor([s[-1] for s in seqs], dtype=torch.long, device=device)
            return self._step(last)
        return self._prefill(list(keys), seqs, device)

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        return self.model.wte.weight.device

    def _extends_cache(self, keys: Sequence[int], seqs: Sequence[Sequence[int]]) -> bool:
        if not self.cache or not set(keys) <= set(self.keys):
            return False
        lengths = self.lengths.tolist()
        return all(
            len(s) == lengths[self.keys.index(k)] + 1 for k, s in zip(keys, seqs, strict=True)
        )

    def _keep(self, rows: torch.Tensor) -> None:
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device))

    def _prefill(
        self, keys: list[int], seqs: Sequence[Sequence[int]], device: torch.device
    ) -> torch.Tensor:
        m = self.model
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        width = int(lengths.max())
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        x = m.drop(m.wte(ids) + m.wpe(torch.arange(width, device=device)))
        self.cache = []
        for block in m.blocks:
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = (
                self._heads(proj(h), attn.head_dim)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            store_k = k.new_zeros((*k.shape[:2], self.block_size, k.shape[-1]))
            store_v = torch.zeros_like(store_k)
            store_k[:, :, :width] = k
            store_v[:, :, :width] = v
            self.cache.append((store_k, store_v))
            # Right padding sits after every real token, so causal attention never sees it.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + attn.resid_drop(attn.o_proj(self._merge(y)))
            x = x + block.mlp(block.ln_2(x))
        self.keys, self.lengths = keys, lengths
        last = x[torch.arange(len(seqs), device=device), lengths - 1]
        return m.lm_head(m.ln_f(last)).float()

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        pos = self.lengths.to(tokens.device)  # the new token's position in each row
        rows = torch.arange(len(tokens), device=tokens.device)
        x = m.drop(m.wte(tokens) + m.wpe(pos)).unsqueeze(1)  # (B, 1, C)
        may_attend = torch.arange(self.block_size, device=tokens.device)[None, :] <= pos[:, None]
        mask = may_attend[:, None, None, :]  # (B, 1, 1, block): this row's positions only
        for block, (store_k, store_v) in zip(m.blocks, self.cache, strict=True):
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = (
                self._heads(proj(h), attn.head_dim)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            store_k[rows, :, pos] = k[:, :, 0]
            store_v[rows, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, store_k, store_v, attn_mask=mask)
            x = x + attn.resid_drop(attn.o_proj(self._merge(y)))
            x = x + block.mlp(block.ln_2(x))
        self.lengths = self.lengths + 1
        return m.lm_head(m.ln_f(x[:, 0])).float()

    @staticmethod
    def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, -1, head_dim).transpose(1, 2)

    @staticmethod
    def _merge(y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return y.transpose(1, 2).reshape(b, t, -1)
