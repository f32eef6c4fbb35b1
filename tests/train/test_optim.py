"""Hyperparameter rules (LR scaling, warmup, decay) and LARS/LAMB against hand-computed steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distml.config import OptimizerSection, ScheduleSection
from distml.train.optim import LAMB, LARS, build_optimizer
from distml.train.schedule import build_scheduler, lr_multiplier, scaled_lr


def test_lr_scaling_rules() -> None:
    assert scaled_lr(0.1, 1024, "linear", 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, "sqrt", 256) == pytest.approx(0.2)
    assert scaled_lr(0.1, 1024, "none", 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 512, "linear", None) == pytest.approx(0.1)  # reference defaults to G


def test_warmup_then_cosine_values() -> None:
    cfg = ScheduleSection(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(s, 14, cfg) for s in range(14)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    # halfway through the 10 decay steps: floor + (1 - floor) * 0.5
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(14, 14, cfg) == pytest.approx(0.1)


def test_scheduler_applies_multiplier_to_peak() -> None:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.8)
    sched = build_scheduler(opt, 10, ScheduleSection(warmup_steps=4, decay="linear"))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_lars_step_matches_hand_computation() -> None:
    w0 = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    g = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    p = nn.Parameter(w0.clone())
    p.grad = g.clone()
    lr, wd, eta = 0.1, 0.01, 0.02
    LARS([p], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta, eps=0.0).step()
    trust = eta * 5.0 / (1.0 + wd * 5.0)
    expected = w0 - lr * trust * (g + wd * w0)
    torch.testing.assert_close(p.data, expected)


def test_lamb_step_matches_hand_computation() -> None:
    w0 = torch.tensor([1.0, -2.0, 2.0])  # ||w|| = 3
    g = torch.tensor([0.5, 0.5, -1.0])
    p = nn.Parameter(w0.clone())
    p.grad = g.clone()
    lr, wd, eps = 0.01, 0.1, 1e-6
    LAMB([p], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd).step()
    # step 1: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) + wd * w
    r = g / (g.abs() + eps) + wd * w0
    expected = w0 - lr * (3.0 / torch.linalg.vector_norm(r)) * r
    torch.testing.assert_close(p.data, expected)


def test_build_optimizer_groups_exclude_1d_from_adaptation() -> None:
    model = nn.Linear(4, 3)
    opt = build_optimizer(model, OptimizerSection(name="lars", weight_decay=0.1), lr=0.5)
    assert [g["adapt"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    sgd = build_optimizer(model, OptimizerSection(name="sgd", nesterov=True), lr=0.5)
    assert sgd.param_groups[0]["nesterov"] is True
