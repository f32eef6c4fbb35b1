"""Optimizer-state offload: fp32 master weights and optimizer state on another device.

:class:`OffloadedOptimizer` wraps any optimizer built by a factory. It keeps an
fp32 master copy of every parameter on ``offload_device`` (CPU by default) and
builds the inner optimizer over those copies, so its state lives there too.
``step()`` copies the gradients to the offload device, steps there and copies
the updated values back into the compute parameters (in their own dtype, so
bf16/fp16 compute weights keep fp32 masters). On a GPU the host buffers are
pinned and copies are asynchronous, with one synchronisation before the
host-side step. With compute device == offload device the same code path runs,
which is how it is tested on CPU-only machines. The wrapper is itself a
``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the inner
optimizer's, so LR schedulers, strategies and the Trainer take it like any
other optimizer (``memory.offload_optimizer: true``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from distml.errors import CheckpointError

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class OffloadedOptimizer(torch.optim.Optimizer):
    """Steps ``optimizer_factory(master_param_groups)`` on ``offload_device``."""

    def __init__(
        self,
        optimizer_factory: OptimizerFactory,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        offload_device: str | torch.device = "cpu",
    ) -> None:
        self.offload_device = torch.device(offload_device)
        items = list(params)
        groups = [g for g in items if isinstance(g, dict)]
        if not groups:
            groups = [{"params": items}]
        self._pairs: list[tuple[Tensor, Tensor]] = []
        master_groups = [
            {**group, "params": [self._master_of(p) for p in group["params"]]} for group in groups
        ]
        self.optimizer = optimizer_factory(master_groups)
        super().__init__([m for _, m in self._pairs], {})
        # Share, not copy: LR schedulers and the inner step must see the same groups.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._grad_buffers: dict[int, Tensor] = {}

    def _master_of(self, p: Tensor) -> Tensor:
        pin = self.offload_device.type == "cpu" and p.is_cuda
        master = torch.empty(
            p.shape, dtype=torch.float32, device=self.offload_device, pin_memory=pin
        )
        master.copy_(p.detach())
        master.requires_grad_(p.requires_grad)
        self._pairs.append((p, master))
        return master

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self._pairs:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def _grad_buffer(self, master: Tensor) -> Tensor:
        buf = self._grad_buffers.get(id(master))
        if buf is None:
            buf = torch.empty_like(master, pin_memory=master.is_pinned())
            self._grad_buffers[id(master)] = buf
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = []
        for p, master in self._pairs:
            if p.grad is None:
                master.grad = None
                continue
            buf = self._grad_buffer(master)
            buf.copy_(p.grad, non_blocking=True)
            master.grad = buf
            stepped.append((p, master))
        if any(p.is_cuda for p, _ in stepped):
            # Device-to-host copies into pinned memory must land before the CPU reads them.
            torch.cuda.synchronize()
        self.optimizer.step()
        for p, master in stepped:
            # Later host-side writes to master follow a synchronize, so this may run async.
            p.copy_(master, non_blocking=True)
            master.grad = None
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the fp32 master weights (tensors only)."""
        sd = self.optimizer.state_dict()
        sd["master_params"] = [m.detach().clone() for _, m in self._pairs]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masters = state_dict.get("master_params")
        if masters is None or len(masters) != len(self._pairs):
            raise CheckpointError(
                "offloaded optimizer state has no matching master_params; "
                "resume with the same parameters and optimizer.offload setting"
            )
        inner = {k: v for k, v in state_dict.items() if k != "master_params"}
        self.optimizer.load_state_dict(inner)
        with torch.no_grad():
            for (p, master), saved in zip(self._pairs, masters, strict=True):
                master.copy_(saved)
                p.copy_(master)
