"""Mixed precision for the training loop: autocast contexts and fp16 dynamic loss scaling.

``schedule.precision`` picks ``fp32`` (no autocast), ``bf16`` or ``fp16``
autocast; the model and the optimizer stay fp32 (master weights). fp16 has a
narrow exponent, so small gradients underflow: :class:`LossScaler` multiplies
the loss by a scale before backward, divides the gradients by it once per
optimizer step (after all accumulation micro-steps, before clipping), skips
the step when a gradient is inf/nan and then halves the scale, and doubles it
after ``growth_interval`` clean steps. It is ``torch.amp.GradScaler`` (CPU and
CUDA) applied to the model's parameters rather than to an optimizer, so the
step itself can be any strategy's ``optimizer_step`` and any optimizer
(AdamW8bit, :class:`~distml.memory.offload.OffloadedOptimizer`). Under DDP the
inf check runs on the all-reduced gradients, which every rank holds equal, so
all ranks skip the same steps. Parameter servers update on the servers, where
the worker-side check cannot reach, so fp16 with ``ps`` (and any strategy but
``ddp``) is refused by :func:`check_strategy_support`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from distml.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str) -> AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device_type`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"schedule.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


def check_strategy_support(
    precision: str, offload_optimizer: bool, strategy: str, model_parallel: bool = False
) -> None:
    """Refuse fp16 or optimizer offload with strategies that step elsewhere than here.

    ``ps`` updates on the servers: an overflowed step could not be skipped, a
    CPU-offloaded optimizer could not be cloned there. Model parallelism
    (``parallel.pp``/``tp`` > 1, the mesh strategy) takes fp16, with the
    overflow check agreed over the world (``LossScaler(sync_overflow=True)``),
    but not offload.
    """
    if strategy == "ddp" and not model_parallel:
        return
    where = "parallel.pp/tp > 1" if model_parallel else f"parallel.strategy={strategy}"
    if precision == "fp16" and not model_parallel:
        raise ConfigError(
            f"schedule.precision=fp16 does not work with {where} (overflowed steps could not "
            "be skipped on every rank); use precision bf16 or strategy ddp"
        )
    if offload_optimizer:
        raise ConfigError(
            f"memory.offload_optimizer=true does not work with {where} (the optimizer does not "
            "step on this process); set it false or use strategy ddp"
        )


class _ParamsAsOptimizer:
    """What GradScaler needs of an optimizer: the parameters and a step to call or skip."""

    def __init__(self, params: list[Tensor]) -> None:
        self.param_groups: list[dict[str, Any]] = [{"params": params}]
        self.step_fn: Callable[[], None] = lambda: None

    def step(self) -> None:
        self.step_fn()


class LossScaler:
    """fp16 dynamic loss scaling over ``params``; a transparent pass-through otherwise.

    Per optimizer step: ``scale(loss).backward()`` for every micro-batch,
    optionally ``unscale_()`` before clipping, then ``step(fn)``, which unscales
    if needed, calls ``fn`` only when every gradient is finite and updates the
    scale. ``step`` returns whether ``fn`` ran.
    """

    def __init__(
        self,
        precision: str,
        device_type: str,
        params: Iterable[Tensor],
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        sync_overflow: bool = False,
    ) -> None:
        self.enabled = precision == "fp16"
        self._device = device_type
        self._scaler: torch.amp.GradScaler
        if self.enabled and sync_overflow:
            # Model parallelism: each rank holds different gradients (other stages, other
            # shards), so "any gradient overflowed" must be agreed over the whole world or
            # one rank would skip the step another takes. torch's ShardedGradScaler (built
            # for FSDP's sharded gradients) all-reduces the overflow flag in unscale_.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self._scaler = ShardedGradScaler(
                device_type, init_scale=init_scale, growth_interval=growth_interval
            )
        else:
            self._scaler = torch.amp.GradScaler(
                device_type,
                init_scale=init_scale,
                growth_interval=growth_interval,
                enabled=self.enabled,
            )
        self._params = _ParamsAsOptimizer([p for p in params if p.requires_grad])
        self._unscaled = False
        self.skipped_steps = 0

    @property
    def scale_value(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def scale(self, loss: Tensor) -> Tensor:
        return self._scaler.scale(loss)

    def step_scale(self) -> float:
        """The scale to multiply this step's loss by (for losses scaled out of our sight).

        Goes through ``GradScaler.scale`` so the scaler sets itself up as if it had
        scaled the loss (a model-parallel step scales inside the pipeline schedule).
        """
        if not self.enabled:
            return 1.0
        return float(self._scaler.scale(torch.ones((), device=self._device)))

    def unscale_(self) -> None:
        """Divide the gradients by the scale now (before clipping or reading them)."""
        if self.enabled and not self._unscaled:
            self._scaler.unscale_(self._params)  # type: ignore[arg-type]
            self._unscaled = True

    def step(self, step_fn: Callable[[], None]) -> bool:
        """Unscale, run ``step_fn`` unless a gradient overflowed, update the scale."""
        if not self.enabled:
            step_fn()
            return True
        stepped = False

        def run() -> None:
            nonlocal stepped
            stepped = True
            step_fn()

        self._params.step_fn = run
        self.unscale_()
        self._scaler.step(self._params)  # type: ignore[arg-type]
        self._scaler.update()
        self._unscaled = False
        self.skipped_steps += int(not stepped)
        return stepped

    def metrics(self) -> dict[str, float | int]:
        """Fields for the step record and the summary (empty unless fp16)."""
        if not self.enabled:
            return {}
        return {"loss_scale": self.scale_value, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {**self._scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale; an empty state (a run saved without fp16) keeps the initial one."""
        if not self.enabled or not state:
            return
        state = dict(state)
        self.skipped_steps = int(state.pop("skipped_steps", 0))
        self._scaler.load_state_dict(state)
