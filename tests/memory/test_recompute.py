"""Recomputation: every mode gives the gradients of no recomputation, alone and under DDP;
state_dict keys survive wrapping; auto mode keeps to its activation budget."""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distml.errors import ConfigError
from distml.memory.recompute import (
    CheckpointWrapper,
    apply_recompute,
    choose_checkpointed,
    measure_saved_bytes,
    profile_blocks,
    remove_recompute,
)
from distml.models.bert import BERT, BERTConfig
from distml.models.cnn import CNN, CNNConfig
from distml.models.gpt import GPT, GPTConfig
from distml.models.layers import SelfAttention
from distml.models.resnet import ResNet, ResNetConfig
from distml.testing import run_ranks

Case = tuple[nn.Module, torch.Tensor, torch.Tensor]


def _gpt_case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=64, dropout=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(64, (2, 16), generator=gen)
    return GPT(cfg).double(), x, torch.randint(64, (2, 16), generator=gen)


def _resnet_case(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    cfg = ResNetConfig(widths=[4, 8], blocks_per_stage=[2, 2], image_size=8)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    return ResNet(cfg).double(), x, torch.randint(10, (4,), generator=gen)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _midway_budget_mb(model: nn.Module, x: torch.Tensor, loss: Callable[[Any], Any]) -> float:
    """A budget that forces some, but not all, blocks to be checkpointed."""
    prof = profile_blocks(model, x, loss)
    full = prof.peak_bytes(range(len(prof.unit_bytes)))
    return (full + prof.peak_bytes()) / 2 / 1e6


def _apply(
    model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, group: Any = None
) -> list[str]:
    if mode != "auto":
        return apply_recompute(model, mode).wrapped
    loss = lambda out: _ce(out, y)  # noqa: E731
    budget = _midway_budget_mb(model, x, loss)
    plan = apply_recompute(
        model, "auto", budget_mb=budget, sample_input=x, loss_fn=loss, sync_group=group
    )
    assert 0 < len(plan.wrapped) < plan.num_blocks
    return plan.wrapped


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    # Same RNG for every mode: dropout masks must match (checkpoint replays them).
    torch.manual_seed(123)
    model.train()
    loss = _ce(model(x), y)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def _modes(case: str) -> list[str]:
    return ["full", "every_k", "auto"] + (["selective"] if case == "gpt" else [])


@pytest.mark.parametrize("case", ["gpt", "resnet"])
def test_every_mode_matches_no_recompute(case: str) -> None:
    make = _gpt_case if case == "gpt" else _resnet_case
    base, x, y = make()
    keys = list(base.state_dict())
    ref_model = copy.deepcopy(base)
    ref_loss, ref_grads = _step(ref_model, x, y)
    for mode in _modes(case):
        model = copy.deepcopy(base)
        _apply(model, mode, x, y)
        assert any(isinstance(m, CheckpointWrapper) for m in model.modules()), mode
        loss, grads = _step(model, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=mode)
        # BatchNorm statistics move once per step, not again during recomputation.
        for got_b, want_b in zip(model.buffers(), ref_model.buffers(), strict=True):
            torch.testing.assert_close(got_b, want_b, rtol=0, atol=0, msg=mode)
        assert list(model.state_dict()) == keys, mode


def test_bert_blocks_take_the_attention_mask_through_the_wrapper() -> None:
    torch.manual_seed(0)
    cfg = BERTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    base = BERT(cfg).double()
    x = torch.randint(32, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    grads = {}
    for mode in ("none", "full", "selective"):
        model = copy.deepcopy(base)
        apply_recompute(model, mode)
        model(x, mask).square().mean().backward()
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in ("full", "selective"):
        for got, want in zip(grads[mode], grads["none"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_state_dict_keys_and_values_round_trip_between_wrapped_and_plain() -> None:
    plain, x, _ = _gpt_case()
    wrapped = copy.deepcopy(plain)
    apply_recompute(wrapped, "selective")
    apply_recompute(wrapped, "full")  # re-planning undoes the earlier wrapping first
    assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == 4
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    other, _, _ = _gpt_case(seed=5)
    wrapped.load_state_dict(other.state_dict())  # plain checkpoint into a wrapped model
    fresh, _, _ = _gpt_case(seed=9)
    fresh.load_state_dict(wrapped.state_dict())  # and back, strictly
    for name, value in other.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
    assert wrapped.blocks[0].attn is wrapped.blocks[0].inner.attn  # attributes fall through
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), fresh.eval()(x), rtol=0, atol=0)


def test_every_k_selective_classes_and_removal() -> None:
    model, _, _ = _gpt_case()
    originals = list(model.blocks)
    plan = apply_recompute(model, "every_k", every_k=3)
    assert plan.wrapped == ["blocks.0", "blocks.3"]
    plan = apply_recompute(model, "selective", module_types=(SelfAttention,))
    assert plan.wrapped == [f"blocks.{i}.attn" for i in range(4)]
    assert remove_recompute(model) == 4
    assert list(model.blocks) == originals
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


def test_user_errors_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs a model with a non-empty `blocks`"):
        apply_recompute(CNN(CNNConfig()), "full")
    model, _, _ = _gpt_case()
    with pytest.raises(ConfigError, match="matched no submodule \\(ffn\\)"):
        apply_recompute(model, "selective", module_types=("ffn",))
    with pytest.raises(ConfigError, match="memory.recompute must be one of"):
        apply_recompute(model, "sometimes")
    with pytest.raises(ConfigError, match="needs memory.budget_mb"):
        apply_recompute(model, "auto")


def test_auto_respects_the_budget_and_checkpoints_only_what_it_must() -> None:
    model, x, y = _gpt_case()
    loss = lambda out: _ce(out, y)  # noqa: E731
    prof = profile_blocks(model, x, loss)
    n = len(prof.unit_bytes)
    none_peak, full_peak = prof.peak_bytes(), prof.peak_bytes(range(n))
    assert measure_saved_bytes(model, x, loss) == prof.saved_bytes()
    for budget in (full_peak, (none_peak + full_peak) // 2):
        plan = apply_recompute(model, "auto", budget_mb=budget / 1e6, sample_input=x, loss_fn=loss)
        assert 0 < len(plan.wrapped) < n  # some blocks stay un-checkpointed
        assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= budget
        measured = measure_saved_bytes(model, x, loss)
        assert measured == plan.predicted_saved_bytes
        assert measured <= budget
    plan = apply_recompute(model, "auto", budget_mb=none_peak / 1e6, sample_input=x, loss_fn=loss)
    assert plan.wrapped == []


def test_impossible_budget_names_the_smallest_feasible_one() -> None:
    model, x, y = _resnet_case()
    loss = lambda out: _ce(out, y)  # noqa: E731
    prof = profile_blocks(model, x, loss)
    smallest = prof.base_bytes + max(prof.unit_bytes)
    stated = math.ceil(smallest / 1e5) / 10
    with pytest.raises(ConfigError) as err:
        apply_recompute(model, "auto", budget_mb=0.01, sample_input=x, loss_fn=loss)
    assert str(err.value) == (
        "memory.budget_mb=0.01 cannot be met even with full recomputation; "
        f"the smallest feasible budget is {stated:.1f} MB"
    )
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())
    plan = apply_recompute(model, "auto", budget_mb=stated, sample_input=x, loss_fn=loss)
    assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= stated * 1e6


def test_auto_choice_is_the_cheapest_feasible_set() -> None:
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 7)
        sizes = [rng.randint(1, 200) for _ in range(n)]
        seconds = [rng.uniform(0.1, 1.0) for _ in range(n)]
        base = rng.randint(0, 100)
        budget = rng.randint(base + max(sizes), base + sum(sizes) + max(sizes))

        def peak(chosen: tuple[int, ...], sizes: list[int] = sizes, base: int = base) -> int:
            kept = [b for i, b in enumerate(sizes) if i not in chosen]
            earlier = [sum(b for j, b in enumerate(sizes[:i]) if j not in chosen) for i in chosen]
            recompute = [base + e + sizes[i] for e, i in zip(earlier, chosen, strict=True)]
            return max([base + sum(kept), *recompute])

        subsets = [c for r in range(n + 1) for c in itertools.combinations(range(n), r)]
        best = min(sum(seconds[i] for i in c) for c in subsets if peak(c) <= budget)
        chosen = tuple(choose_checkpointed(sizes, seconds, base, budget))
        assert peak(chosen) <= budget
        assert sum(seconds[i] for i in chosen) == pytest.approx(best, abs=1e-6)


def _ddp_all_modes(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    diffs: dict[str, Any] = {}
    for case, make in (("gpt", _gpt_case), ("resnet", _resnet_case)):
        base, _, _ = make()
        _, x, y = make(seed=10 + rank)  # each rank its own shard of the batch
        reference = None
        for mode in ["none", *_modes(case)]:
            model = copy.deepcopy(base)
            if mode != "none":
                diffs[f"{case}/{mode}/wrapped"] = _apply(model, mode, x, y, dist.group.WORLD)
            _, grads = _step(DDP(model), x, y)
            if reference is None:
                reference = grads
                continue
            for got, want in zip(grads, reference, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=mode)
            diffs[f"{case}/{mode}"] = max(
                float((g - r).abs().max()) for g, r in zip(grads, reference, strict=True)
            )
        assert reference is not None
        diffs[f"{case}/grad_sum"] = float(sum(g.sum() for g in reference))
    return diffs


def test_all_modes_match_under_ddp_world_2() -> None:
    results = run_ranks(_ddp_all_modes, 2, timeout=120)
    modes = [(case, mode) for case in ("gpt", "resnet") for mode in _modes(case)]
    for rank_result in results:
        for case, mode in modes:
            assert rank_result[f"{case}/{mode}"] <= 1e-10, (case, mode)
    # DDP averaged the gradients, and auto chose the same blocks on both ranks.
    for case in ("gpt", "resnet"):
        assert results[0][f"{case}/grad_sum"] == pytest.approx(results[1][f"{case}/grad_sum"])
        assert results[0][f"{case}/auto/wrapped"] == results[1][f"{case}/auto/wrapped"]
