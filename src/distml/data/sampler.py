"""Deterministic, resumable distributed sampling.

Training uses *global-batch* sampling: each epoch draws one permutation of the
dataset from (seed, epoch); global batch ``b`` is ``perm[b*G:(b+1)*G]`` and rank
``r`` of ``W`` takes the r-th contiguous slice of it. So the samples in each
optimizer step do not depend on the world size: a run resumed on a different
number of workers continues the same trajectory, and DDP equals a
single-process run on the same global batch. The trailing ``N mod G`` samples of
an epoch are dropped (a fresh permutation each epoch means every sample is
still seen over epochs); this is the documented choice for sizes that don't
divide. Evaluation and prediction instead use :func:`shard_range`: contiguous,
disjoint shards that cover every sample exactly once (sizes may differ by one).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from distml.errors import ConfigError


def per_worker_batch(global_batch: int, world_size: int, accumulation_steps: int) -> int:
    """Samples per micro-batch per worker; a clear error when it doesn't divide."""
    denom = world_size * accumulation_steps
    if global_batch % denom != 0:
        lower = max(denom, global_batch // denom * denom)
        raise ConfigError(
            f"data.global_batch_size={global_batch} is not divisible by workers x accumulation "
            f"steps = {world_size} x {accumulation_steps} = {denom}; use a multiple of {denom} "
            f"such as {lower} or {lower + denom}"
        )
    return global_batch // denom


class GlobalBatchSampler:
    """Yields this rank's micro-batch index tensors for one epoch, resumable mid-epoch."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.micro = per_worker_batch(global_batch, world_size, accumulation_steps)
        if num_samples < global_batch:
            raise ConfigError(
                f"the training split has {num_samples} samples, fewer than "
                f"data.global_batch_size={global_batch}; lower the batch size"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def global_batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        perm = self.permutation(epoch)
        return perm[step * self.global_batch : (step + 1) * self.global_batch]

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[torch.Tensor]]:
        """Per remaining step of ``epoch``: this rank's ``accumulation_steps`` micro-batches."""
        perm = self.permutation(epoch)
        per_rank = self.global_batch // self.world_size
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.global_batch + self.rank * per_rank
            mine = perm[base : base + per_rank]
            yield list(mine.split(self.micro))


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard; shards are disjoint and cover all samples."""
    start = num_samples * rank // world_size
    stop = num_samples * (rank + 1) // world_size
    return start, stop
