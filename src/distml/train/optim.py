"""Optimizers: torch's SGD and AdamW, plus LARS and LAMB implemented here.

LARS (You et al. 2017) scales each layer's step by the trust ratio
``eta * ||w|| / (||g|| + wd * ||w||)``; LAMB (You et al. 2019) applies the same
idea to Adam's update ``r = m_hat / (sqrt(v_hat) + eps) + wd * w`` with ratio
``||w|| / ||r||``. Both are the large-batch optimizers of the hyperparameter
rules; 1-D parameters (biases, norm weights) are left out of adaptation and
weight decay by default, as in the papers' reference setups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from distml.config import OptimizerSection


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-9,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            adapt=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                wd = group["weight_decay"]
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = (
                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    )
                    # A zero weight or gradient norm means no information: fall back to 1.
                    trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                else:
                    trust = torch.ones((), dtype=p.dtype, device=p.device)
                update = grad.add(p, alpha=wd) if wd else grad.clone()
                update.mul_(trust * group["lr"])
                state = self.state[p]
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update
                    else:
                        buf.mul_(group["momentum"]).add_(update)
                    update = buf
                p.sub_(update)
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam moments with a layer-wise trust ratio on the full update."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                    )
                else:
                    trust = torch.ones((), dtype=p.dtype, device=p.device)
                p.sub_(update * (trust * group["lr"]))
        return loss


def _split_1d(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    matrices: list[nn.Parameter] = []
    vectors: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (vectors if param.ndim <= 1 else matrices).append(param)
    return matrices, vectors


def _param_groups(model: nn.Module, cfg: OptimizerSection) -> list[dict[str, Any]]:
    if cfg.name in ("lars", "lamb") and cfg.exclude_1d:
        matrices, vectors = _split_1d(model)
        groups: list[dict[str, Any]] = [
            {"params": matrices},
            {"params": vectors, "weight_decay": 0.0, "adapt": False},
        ]
        return [g for g in groups if g["params"]]
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _make_optimizer(
    groups: list[dict[str, Any]], cfg: OptimizerSection, lr: float
) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw8bit":
        from distml.memory import AdamW8bit

        return AdamW8bit(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
        )
    return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(
    model: nn.Module, cfg: OptimizerSection, lr: float, offload: bool = False
) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters at peak ``lr``.

    With ``offload`` it steps fp32 master copies in CPU memory (pinned when the
    model is on CUDA) and copies the results back: ``memory.offload_optimizer``.
    """
    groups = _param_groups(model, cfg)
    if offload:
        from distml.memory.offload import OffloadedOptimizer

        return OffloadedOptimizer(lambda masters: _make_optimizer(masters, cfg, lr), groups)
    return _make_optimizer(groups, cfg, lr)
