"""In-memory datasets with vectorised batch access, and what a dataset tells a model.

All built-in datasets fit in memory, so batches are gathered with one
indexing operation (``get_batch(indices)``) instead of per-item collation:
that keeps the input pipeline far faster than the model on every workload we
ship and makes the data-loading rate a measured number, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataInfo:
    """Facts a model builder needs: task kind and shape-determining sizes."""

    task: str  # "classification" | "causal_lm" | "masked_lm"
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    vocab_size: int = 0
    seq_len: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def model_defaults(self) -> dict[str, Any]:
        """Model-config fields implied by the data (applied where a model has them)."""
        out: dict[str, Any] = {}
        if self.task == "classification":
            out["num_classes"] = self.num_classes
            if self.input_shape:
                numel = 1
                for dim in self.input_shape:
                    numel *= dim
                out["in_features"] = numel
            if len(self.input_shape) == 3:
                out["in_channels"] = self.input_shape[0]
                out["image_size"] = self.input_shape[1]
        else:
            out["vocab_size"] = self.vocab_size
            out["block_size"] = self.seq_len
        return out


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs and targets held as tensors; ``get_batch`` gathers many samples at once."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError("inputs and targets must have the same length")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


@dataclass
class DataBundle:
    """Train and test splits of one dataset plus its :class:`DataInfo`."""

    train: Any
    test: Any
    info: DataInfo
