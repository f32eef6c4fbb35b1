"""Per-step metrics (JSONL on rank 0), the loss per task, and the end-of-run summary.

The summary answers the first question a user has before picking a
parallelism: what bounds this run? It compares the input pipeline's rate
(samples/s it can deliver, from time spent loading) with the training rate
(samples/s of compute plus communication) and names the bottleneck.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy for classification or (masked/causal) language modelling."""
    if task == "classification":
        return F.cross_entropy(logits.float(), targets)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def task_sums(
    logits: torch.Tensor, targets: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of losses, number correct, number counted) for exact distributed averaging."""
    if task == "classification":
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(dim=-1) == targets).sum()
        return loss, correct, torch.tensor(targets.numel(), device=logits.device)
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    keep = flat_targets != -100
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    correct = ((flat_logits.argmax(dim=-1) == flat_targets) & keep).sum()
    return loss, correct, keep.sum()


class MetricsWriter:
    """Appends one JSON object per line; a no-op on non-zero ranks."""

    def __init__(self, path: Path | None, append: bool = False) -> None:
        self._fh: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            # One line per step, flushed: schedulers and dashboards read this file live,
            # and a killed job must not lose the lines of steps it already finished.
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class StepTimes:
    """Per-step timings (seconds) collected on rank 0 for the summary."""

    data: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    comm: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)

    def add(self, data: float, compute: float, comm: float, step: float) -> None:
        self.data.append(data)
        self.compute.append(compute)
        self.comm.append(comm)
        self.step.append(step)


def _median(values: list[float], skip_first: int = 1) -> float:
    # The first steps include one-off costs (allocator warm-up, DDP bucket rebuild).
    usable = values[skip_first:] if len(values) > skip_first else values
    return statistics.median(usable) if usable else 0.0


def bottleneck_report(times: StepTimes, global_batch: int) -> dict[str, Any]:
    """Data-loading vs training rate (samples/s) and which one bounds the run."""
    t_data = _median(times.data)
    t_compute = _median(times.compute)
    t_comm = _median(times.comm)
    t_step = _median(times.step)
    data_rate = global_batch / t_data if t_data > 0 else float("inf")
    train_time = t_compute + t_comm
    train_rate = global_batch / train_time if train_time > 0 else float("inf")
    if data_rate < train_rate:
        bound = "data loading"
    elif t_comm > t_compute:
        bound = "communication"
    else:
        bound = "compute"
    return {
        "median_step_s": t_step,
        "median_data_s": t_data,
        "median_compute_s": t_compute,
        "median_comm_s": t_comm,
        "samples_per_s": global_batch / t_step if t_step > 0 else 0.0,
        "data_samples_per_s": data_rate,
        "train_samples_per_s": train_rate,
        "bound": bound,
    }
