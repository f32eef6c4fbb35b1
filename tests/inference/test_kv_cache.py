"""Key/value-cache decoding equals recomputing the window: logits, greedy and sampled tokens."""

from __future__ import annotations

import pytest
import torch

from distml.inference.generate import generate
from distml.inference.kv_cache import KVCacheDecoder, supports_kv_cache
from distml.models.gpt import GPT, GPTConfig
from distml.serve.generation import SamplingParams, generate_batch


def _gpt(block_size: int = 12) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return GPT(cfg).double().eval()


def _full_last_logits(model: GPT, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


def test_prefill_and_steps_equal_full_forwards_with_ragged_rows_leaving() -> None:
    model = _gpt()
    decoder = KVCacheDecoder(model)
    seqs = {0: [1, 2, 3], 1: [4], 2: [5, 6, 7, 8, 9]}  # ragged prompts, right-padded inside
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        if step == 3:
            del seqs[1]  # a finished row leaves the batch
        keys = sorted(seqs)
        got = decoder.logits(keys, [seqs[k] for k in keys])
        assert got is not None
        for r, k in enumerate(keys):
            torch.testing.assert_close(
                got[r].double(), _full_last_logits(model, seqs[k]), rtol=1e-6, atol=1e-6
            )
            seqs[k].append(int(torch.randint(11, (1,), generator=gen)))
    # Row 2 now holds 11 tokens (cached: 10); 11 and 12 fit the block of 12, 13 do not.
    full = [*seqs[2], 1]
    for n in (11, 12):
        got = decoder.logits([2], [full[:n]])
        assert got is not None
        torch.testing.assert_close(
            got[0].double(), _full_last_logits(model, full[:n]), rtol=1e-6, atol=1e-6
        )
    assert decoder.logits([2], [[*full, 2]]) is None


def test_generate_with_cache_equals_recomputation_also_past_the_block() -> None:
    model = _gpt(block_size=8)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]  # rows cross block_size while decoding
    for temperature, seed in ((0.0, None), (0.9, 7)):
        cached = generate(model, prompts, 10, temperature, seed=seed)
        plain = generate(model, prompts, 10, temperature, seed=seed, use_cache=False)
        assert cached == plain


def test_serving_batches_decode_with_the_cache_like_without() -> None:
    model = _gpt()
    prompts = [torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6])]
    params = [SamplingParams(5, 0.0), SamplingParams(3, 0.8, top_k=4, seed=2)]
    plain = generate_batch(lambda ids: model(ids), prompts, params, 12)
    cached = generate_batch(
        lambda ids: model(ids), prompts, params, 12, decoder=KVCacheDecoder(model)
    )
    assert cached == plain and [len(t) for t in cached] == [5, 3]


def test_only_plain_gpt_is_cached() -> None:
    assert supports_kv_cache(_gpt())
    assert not supports_kv_cache(torch.nn.Linear(2, 2))
    sharded = _gpt()
    sharded.tensor_parallel = object()  # what apply_tensor_parallel attaches
    assert not supports_kv_cache(sharded)
    with pytest.raises(ValueError, match="plain single-process distml GPT"):
        KVCacheDecoder(sharded)
