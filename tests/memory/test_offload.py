"""OffloadedOptimizer: same result as the plain optimizer, fp32 masters, groups, resume."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from distml.errors import CheckpointError
from distml.memory import AdamW8bit, OffloadedOptimizer, optimizer_state_bytes


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def _step(model: nn.Module, opt: torch.optim.Optimizer | OffloadedOptimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 32, generator=gen)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize(
    "factory",
    [
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
        lambda groups: AdamW8bit(groups, lr=1e-2, min_8bit_size=256, block_size=128),
    ],
    ids=["adamw", "adamw8bit"],
)
def test_offloaded_equals_plain_optimizer_after_five_steps(
    factory: Callable[[Any], torch.optim.Optimizer],
) -> None:
    plain = _model()
    offloaded = copy.deepcopy(plain)
    opt_plain = factory(plain.parameters())
    opt_off = OffloadedOptimizer(factory, offloaded.parameters(), offload_device="cpu")
    for step in range(5):
        _step(plain, opt_plain, step)
        _step(offloaded, opt_off, step)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), offloaded.parameters(), strict=True)
    )
    # The state lives with the masters, not the compute parameters.
    master_ids = {id(m) for g in opt_off.param_groups for m in g["params"]}
    assert set(map(id, opt_off.state)) == master_ids
    assert not master_ids & {id(p) for p in offloaded.parameters()}
    assert optimizer_state_bytes(opt_off) == optimizer_state_bytes(opt_plain)


def test_bf16_compute_params_keep_fp32_masters() -> None:
    shapes = [(16, 24), (24,)]
    # Start from bf16-representable values: the masters are built from bf16 params.
    init = [torch.randn(s).to(torch.bfloat16).float() for s in shapes]
    ref = [p.clone().requires_grad_() for p in init]
    compute = [p.to(torch.bfloat16).requires_grad_() for p in init]
    opt_ref = torch.optim.AdamW(ref, lr=1e-3)
    opt = OffloadedOptimizer(lambda g: torch.optim.AdamW(g, lr=1e-3), compute)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for r, c in zip(ref, compute, strict=True):
            g = torch.randn(r.shape, generator=gen).to(torch.bfloat16)
            r.grad, c.grad = g.float(), g
        opt_ref.step()
        opt.step()
    masters = [m for g in opt.param_groups for m in g["params"]]
    for r, c, m in zip(ref, compute, masters, strict=True):
        assert m.dtype == torch.float32 and c.dtype == torch.bfloat16
        # Updates of 1e-3 vanish in bf16 weights; the fp32 master keeps them exactly.
        assert torch.equal(m, r.detach())
        assert torch.equal(c, m.to(torch.bfloat16))


def test_param_groups_and_lr_scheduler_reach_the_inner_optimizer() -> None:
    model = _model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[2].parameters(), "lr": 0.0},
    ]
    opt = OffloadedOptimizer(lambda g: torch.optim.SGD(g, lr=0.5), groups)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    frozen = model[2].weight.detach().clone()
    before = model[0].weight.detach().clone()
    _step(model, opt, 0)
    sched.step()
    assert torch.equal(model[2].weight, frozen)  # lr 0 group untouched
    assert not torch.equal(model[0].weight, before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_state_dict_roundtrip_continues_identically_and_checks_masters() -> None:
    model = _model()

    def factory(g: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(g, lr=1e-2)

    opt = OffloadedOptimizer(factory, model.parameters())
    for step in range(3):
        _step(model, opt, step)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = OffloadedOptimizer(factory, resumed.parameters())
    opt2.load_state_dict(saved["opt"])
    for step in range(3, 6):
        _step(model, opt, step)
        _step(resumed, opt2, step)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    with pytest.raises(CheckpointError, match=r"no matching master_params; resume with the same"):
        opt2.load_state_dict(factory([{"params": [torch.zeros(1)]}]).state_dict())
