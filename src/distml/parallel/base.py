"""The strategy interface: how a parallelism plugs into the one training loop.

A strategy wraps a plain model for the loop (``setup``), says how to skip
gradient synchronisation on accumulation micro-steps (``no_sync``), reports
the communication time of the last step, and gives and takes extra state for
checkpoints (e.g. compression residuals). The Trainer knows nothing else about
how gradients travel.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from distml.runtime.dist import DistContext

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist


class Strategy:
    """Base class; the single-process strategy is this class itself (no communication)."""

    name = "single"

    # ---- roles and data partition (parameter servers split the world into roles)
    def is_server(self, ctx: DistContext) -> bool:
        """True on ranks that serve parameters instead of running the training loop."""
        return False

    def serve(self, trainer: Any) -> dict[str, Any]:
        """The loop of a server rank; returns its summary when training ends."""
        raise NotImplementedError(f"strategy {self.name!r} has no server role")

    def data_partition(self, ctx: DistContext) -> tuple[int, int]:
        """(rank, count) of this process among the ranks that consume training data."""
        return ctx.rank, ctx.world_size

    def data_group(self) -> dist.ProcessGroup | None:
        """Process group of the data-consuming ranks (None: the default group)."""
        return None

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update after the gradients are ready (PS: push and pull instead)."""
        optimizer.step()

    def setup(self, model: nn.Module, ctx: DistContext) -> nn.Module:
        return model

    # ---- model parallelism (the mesh strategy); the defaults keep the plain loop
    def prepare(self, model: nn.Module, ctx: DistContext, seed: int) -> nn.Module:
        """Apply plans that reshape the model, before the optimizer is built.

        Returns the module whose parameters this rank trains (the optimizer is
        built on it); by default the whole model.
        """
        return model

    def forward_backward(
        self,
        model: nn.Module,
        micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
        task: str,
        loss_scale: float = 1.0,
    ) -> tuple[float, float] | None:
        """Forward and backward of a step: (loss, exposed comm s); None runs the loop's own.

        Backward runs on the loss times ``loss_scale`` (fp16 loss scaling); the
        returned loss is unscaled.
        """
        return None

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the norm of the whole gradient (model-parallel ranks hold parts of it)."""
        import torch

        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def reports(self, ctx: DistContext, data_rank: int) -> bool:
        """True on the one rank that writes metrics and progress."""
        return data_rank == 0

    def eval_module(self, model: nn.Module) -> nn.Module:
        """The module evaluation calls: logits of the whole model for a batch."""
        return model

    #: True when the strategy writes its own (sharded) checkpoints via ``save_checkpoint``.
    owns_checkpoints = False

    def save_checkpoint(self, trainer: Any) -> Path | None:
        raise NotImplementedError(f"strategy {self.name!r} uses the trainer's checkpoints")

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        from contextlib import nullcontext

        return nullcontext()

    def begin_backward(self) -> None:
        """Called right before the synchronising backward pass."""

    def exposed_comm_seconds(self, backward_end: float) -> float:
        """Seconds of the last backward spent waiting for communication."""
        return 0.0

    def comm_busy_seconds(self) -> float:
        """Seconds communication was in flight (may overlap compute), since the last call."""
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {}
