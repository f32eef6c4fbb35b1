"""Batched autoregressive generation: many prompts, one forward pass per step.

:func:`generate_batch` decodes several requests together with a causal LM
given only as ``logits_fn(ids) -> logits``, so the same code runs a local
model or a model-parallel process group. Prompts of different lengths are
right-padded; since attention is causal, padding after a row's last token
cannot change that row's logits, and each row reads its next-token logits at
its own last position. Each row keeps its own temperature, top-k, step count
and random generator, so a row's tokens equal those of generating it alone
(``GPT.generate`` one token at a time with the same generator). Finished rows
leave the batch. Packing and filtering are :mod:`distml.inference.generate`'s;
what serving adds is per-request sampling settings, generators and streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distml.inference.generate import filter_logits, last_token_logits
from distml.inference.kv_cache import KVCacheDecoder

#: (B, T) token ids -> (B, T, vocab) logits.
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
#: Called as on_token(row, token) right after each row's token is chosen.
OnToken = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None


def _next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One row's next token from its (1, vocab) logits, sampled exactly as GPT.generate does."""
    if params.temperature == 0:
        return int(logits.argmax(dim=-1))
    probs = F.softmax(filter_logits(logits, params.temperature, params.top_k, None), dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


@torch.no_grad()
def generate_batch(
    logits_fn: LogitsFn,
    prompts: list[torch.Tensor],
    params: list[SamplingParams],
    block_size: int,
    on_token: OnToken | None = None,
    device: torch.device | None = None,
    decoder: KVCacheDecoder | None = None,
) -> list[list[int]]:
    """The new tokens of every prompt, decoded together; row i gets ``params[i].max_new_tokens``.

    With a ``decoder`` (key/value cache of the same model) each step feeds one token per
    row while the rows fit the block; ``logits_fn`` recomputes the window otherwise.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
    device = device or torch.device("cpu")
    seqs = [p.reshape(-1).tolist() for p in prompts]
    generators = [
        torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        for p in params
    ]
    new: list[list[int]] = [[] for _ in prompts]
    active = [i for i, p in enumerate(params) if p.max_new_tokens > 0]
    while active:
        # Each row sees at most its last block_size tokens, as GPT.generate crops them.
        logits = decoder.logits(active, [seqs[i] for i in active]) if decoder else None
        if logits is None:
            windows = [seqs[i][-block_size:] for i in active]
            logits = last_token_logits(logits_fn, windows, device)
        for r, i in enumerate(active):
            token = _next_token(logits[r : r + 1], params[i], generators[i])
            seqs[i].append(token)
            new[i].append(token)
            if on_token is not None:
                on_token(i, token)
        active = [i for i in active if len(new[i]) < params[i].max_new_tokens]
    return new
