"""Hyperparameter rules: LR scaling with the global batch, warmup and decay.

The peak LR is ``lr * k`` with ``k = G / G_ref`` (linear rule, Goyal et al.
2017), ``sqrt(G / G_ref)`` (square-root rule) or 1, where ``G`` is the global
batch and ``G_ref`` the reference batch the base LR was tuned for. The
schedule warms up linearly from ``peak / warmup_steps`` to the peak over
``warmup_steps`` steps (the gradual warmup of Goyal et al.), then stays
constant or decays (cosine or linear) to ``min_lr_ratio * peak``.
"""

from __future__ import annotations

import math

import torch

from distml.config import ScheduleSection


def scaled_lr(base_lr: float, global_batch: int, rule: str, reference_batch: int | None) -> float:
    """The peak learning rate after the batch-size scaling rule."""
    ref = reference_batch or global_batch
    ratio = global_batch / ref
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    """Factor applied to the peak LR at optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, cfg)
    )
