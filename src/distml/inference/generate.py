"""Autoregressive text generation from a causal language model, one batch of prompts at a time.

Prompts of different lengths are re-packed right-padded, and each row reads the
logits at its own last real token; because the models are causal, a row's
logits never see the padding after it, so a batched run gives every row exactly
what a run of that prompt alone would give. Contexts longer than the model's
block size are cropped to their last ``block_size`` tokens. A plain distml
GPT decodes with a key/value cache (:mod:`distml.inference.kv_cache`) while
the rows fit its block; otherwise each new token re-runs the (cropped)
context through a plain ``logits_fn(ids)``, which a tensor- or
pipeline-parallel forward can replace. Sampling: greedy at ``temperature=0``,
else temperature, top-k and top-p (nucleus) filtering with a seeded generator
for reproducible samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from distml.data.text import ByteTokenizer, CharTokenizer
from distml.errors import UserError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def model_logits_fn(model: nn.Module) -> LogitsFn:
    """``ids (B, T) -> logits (B, T, V)`` for distml models and Hugging Face LM heads."""

    def call(ids: torch.Tensor) -> torch.Tensor:
        out: Any = model(ids)
        # Hugging Face models return an output object holding the logits.
        return out.logits if hasattr(out, "logits") else out

    return call


def model_block_size(model: nn.Module) -> int | None:
    """The longest context the model accepts, read from its config (distml or Hugging Face)."""
    cfg = getattr(model, "config", None)
    for key in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def unpad_prompts(
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Ragged token lists from a list of lists, or a (B, T) tensor padded on either side."""
    if not isinstance(prompt_ids, torch.Tensor):
        rows = [[int(t) for t in row] for row in prompt_ids]
    else:
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids.unsqueeze(0)
        if attention_mask is None:
            rows = prompt_ids.tolist()
        else:
            if attention_mask.shape != prompt_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal the "
                    f"prompt shape {tuple(prompt_ids.shape)}"
                )
            keep = attention_mask.bool()
            rows = [ids[m].tolist() for ids, m in zip(prompt_ids, keep, strict=True)]
    if not rows or any(len(row) == 0 for row in rows):
        raise UserError("every prompt needs at least one token; pass a non-empty prompt")
    return rows


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Scale by 1/temperature, then keep the top-k and the smallest top-p nucleus (else -inf)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best always stays.
        above = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = above >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def last_token_logits(
    call: LogitsFn, windows: Sequence[Sequence[int]], device: torch.device | str, pad_id: int = 0
) -> torch.Tensor:
    """One forward over right-padded ``windows``; (B, V) float logits at each row's last token."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    for r, w in enumerate(windows):
        ids[r, : len(w)] = torch.tensor(list(w), dtype=torch.long)
    logits = call(ids.to(device))
    last = torch.tensor([len(w) - 1 for w in windows], device=logits.device)
    return logits[torch.arange(len(windows), device=logits.device), last].float()


def check_sampling_args(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: nn.Module | None,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    logits_fn: LogitsFn | None = None,
    suppress_ids: Sequence[int] = (),
    eos_id: int | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (prompt not included), at most ``max_new_tokens`` each.

    ``logits_fn`` (default: the model's forward) maps right-padded ids (B, T) to
    logits (B, T, V); ``block_size`` (default: from the model's config) crops the
    context. ``suppress_ids`` are never produced (e.g. a tokenizer's [MASK]); a
    row stops after producing ``eos_id``. The model is run in eval mode. A plain
    distml GPT (no ``logits_fn``) decodes with a key/value cache while the rows
    fit its block (``use_cache``); the tokens are those of recomputation.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if model is None and logits_fn is None:
        raise ValueError("pass a model or a logits_fn")
    rows = unpad_prompts(prompt_ids, attention_mask)
    if block_size is None and model is not None:
        block_size = model_block_size(model)
    if device is None:
        first = next(iter(model.parameters()), None) if model is not None else None
        device = first.device if first is not None else torch.device("cpu")
    call = logits_fn or model_logits_fn(model)  # type: ignore[arg-type]
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    seqs = [list(row) for row in rows]
    new: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    from distml.inference.kv_cache import KVCacheDecoder, supports_kv_cache

    cacheable = use_cache and logits_fn is None and supports_kv_cache(model)
    decoder = KVCacheDecoder(model) if cacheable else None  # type: ignore[arg-type]
    try:
        for _ in range(max_new_tokens):
            if not live:
                break
            step_logits = decoder.logits(live, [seqs[i] for i in live]) if decoder else None
            if step_logits is None:  # no cache, or a row outgrew the block: recompute the window
                windows = [seqs[i][-block_size:] if block_size else seqs[i] for i in live]
                step_logits = last_token_logits(call, windows, device, pad_id)
            if suppress_ids:
                step_logits[:, list(suppress_ids)] = float("-inf")
            if temperature == 0:
                chosen = step_logits.argmax(dim=-1)
            else:
                probs = torch.softmax(filter_logits(step_logits, temperature, top_k, top_p), -1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            still = []
            for r, token in zip(live, chosen.tolist(), strict=True):
                seqs[r].append(token)
                new[r].append(token)
                if token != eos_id:
                    still.append(r)
            live = still
    finally:
        if model is not None:
            model.train(was_training)
    return new


def tokenizer_from_state(state: dict[str, Any]) -> CharTokenizer | ByteTokenizer:
    """Rebuild the text tokenizer a checkpoint was trained with (``trainer.tokenizer_state``)."""
    spec = state.get("tokenizer") or {}
    if spec.get("kind") == "char":
        # CharTokenizer sorts the distinct characters of its text: the saved string rebuilds it.
        return CharTokenizer(str(spec["chars"]))
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    raise UserError(
        f"checkpoint model {state.get('model_name')!r} has no text tokenizer; "
        "generate from a model trained on data.name=text"
    )


def load_generation_model(
    checkpoint: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], nn.Module, CharTokenizer | ByteTokenizer]:
    """(checkpoint meta, whole model on ``device``, tokenizer) of a causal-LM checkpoint.

    Accepts a ``step_*.pt`` file or a sharded ``step_*.dcp`` directory (any plan).
    """
    from pathlib import Path

    from distml.inference.predict import model_from_checkpoint
    from distml.train.checkpoint import load_checkpoint

    model: nn.Module
    if Path(checkpoint).is_dir():
        from distml.parallel.mesh_checkpoint import load_full_model

        state, model = load_full_model(checkpoint)
    else:
        state = load_checkpoint(checkpoint)
        model = model_from_checkpoint(state)
    if state.get("task") != "causal_lm":
        raise UserError(
            f"{checkpoint} holds a {state.get('task')} model; generation needs a causal_lm "
            "model such as gpt"
        )
    return state, model.to(device), tokenizer_from_state(state)


def generate_text(
    checkpoint: str,
    prompts: Sequence[str],
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
    *,
    logits_fn_for: Callable[[nn.Module], LogitsFn] | None = None,
) -> list[str]:
    """Prompt plus generated text for each prompt, from a causal-LM checkpoint.

    ``logits_fn_for(model)`` swaps the model's forward for another one with the
    same logits (e.g. a tensor- or pipeline-parallel forward on every rank).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if any(not p for p in prompts):
        raise UserError("--prompt is empty; give at least one character of text to continue")
    _, model, tokenizer = load_generation_model(checkpoint, device)
    block_size = model_block_size(model)
    model.eval()
    ids = [tokenizer.encode(p).tolist() for p in prompts]
    if logits_fn_for is None:  # the model itself: generate() can use its key/value cache
        new = generate(
            model,
            ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            suppress_ids=[tokenizer.mask_id],
            device=device,
        )
        return [p + tokenizer.decode(n) for p, n in zip(prompts, new, strict=True)]
    call = logits_fn_for(model)
    new = generate(
        None,
        ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        block_size=block_size,
        logits_fn=call,
        suppress_ids=[tokenizer.mask_id],
        device=device,
    )
    return [p + tokenizer.decode(n) for p, n in zip(prompts, new, strict=True)]
