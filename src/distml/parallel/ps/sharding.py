"""Which parameter server owns which bytes: a balanced, deterministic shard plan.

Every rank computes the same plan from the parameter shapes alone, so no plan
is ever sent. Tensors larger than a target chunk size are cut into
contiguous, nearly equal element ranges of their flattened view; chunks are
then bin-packed largest first onto the least-loaded server. Greedy placement
keeps ``max_load - min_load <= largest_chunk``, and the target chunk is a
small fraction of the average load, which bounds the imbalance. Optimizers
whose update is not elementwise (layer-wise trust ratios of LARS/LAMB) need
whole tensors, so splitting can be turned off.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distml.errors import ConfigError

#: Chunks per server the target chunk size aims at; the imbalance bound is ~1/this.
CHUNKS_PER_SERVER = 16
#: Never cut tensors into pieces smaller than this (tiny messages cost more than they save).
MIN_CHUNK_BYTES = 4096


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, stop)`` of the flattened parameter ``name``, owned by ``server``."""

    name: str
    index: int
    start: int
    stop: int
    #: Shape the server stores: the parameter's own shape when whole, else 1-D.
    shape: tuple[int, ...]
    element_size: int
    server: int
    #: Elements of the whole parameter (equal to ``numel`` when the chunk is whole).
    param_numel: int

    @property
    def whole(self) -> bool:
        return self.numel == self.param_numel

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    @property
    def key(self) -> str:
        return f"{self.name}@{self.start}"


@dataclass(frozen=True)
class ShardPlan:
    """The chunks of every server, each server's list in parameter order."""

    num_servers: int
    chunks: tuple[Chunk, ...]

    def server_chunks(self, server: int) -> list[Chunk]:
        return [c for c in self.chunks if c.server == server]

    def server_bytes(self) -> list[int]:
        loads = [0] * self.num_servers
        for chunk in self.chunks:
            loads[chunk.server] += chunk.nbytes
        return loads

    def imbalance(self) -> float:
        """``max / min - 1`` of the per-server bytes (0 is perfect balance)."""
        loads = self.server_bytes()
        return max(loads) / max(1, min(loads)) - 1.0

    def table(self) -> str:
        """A plain-text table: per server, its bytes, chunks and parameters."""
        rows = [("server", "bytes", "share", "chunks", "split tensors", "parameters")]
        loads = self.server_bytes()
        total = max(1, sum(loads))
        for s in range(self.num_servers):
            mine = self.server_chunks(s)
            names = sorted({c.name for c in mine})
            split = sorted({c.name for c in mine if not c.whole})
            listed = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
            rows.append(
                (
                    str(s),
                    f"{loads[s]:,}",
                    f"{100.0 * loads[s] / total:.1f}%",
                    str(len(mine)),
                    str(len(split)),
                    listed,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [
            "  ".join(cell.rjust(w) for cell, w in zip(row[:-1], widths, strict=True))
            + "  "
            + row[-1]
            for row in rows
        ]
        lines.append(f"imbalance (max/min - 1): {100.0 * self.imbalance():.1f}%")
        return "\n".join(lines)


def _split_ranges(numel: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(numel, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def plan_shards(
    params: Sequence[tuple[str, torch.Tensor]],
    num_servers: int,
    split_tensors: bool = True,
    chunks_per_server: int = CHUNKS_PER_SERVER,
    min_chunk_bytes: int = MIN_CHUNK_BYTES,
) -> ShardPlan:
    """Assign ``params`` (name, tensor; only shapes and dtypes are read) to servers."""
    if num_servers < 1:
        raise ConfigError(f"parallel.servers must be at least 1, got {num_servers}")
    total = sum(p.numel() * p.element_size() for _, p in params)
    target = max(min_chunk_bytes, math.ceil(total / (num_servers * chunks_per_server)))
    pieces: list[tuple[str, int, int, int, tuple[int, ...], int, int]] = []
    for index, (name, p) in enumerate(params):
        numel, esize = p.numel(), p.element_size()
        # One server holds everything whole: cutting would only add messages.
        split = split_tensors and num_servers > 1
        parts = math.ceil(numel * esize / target) if split else 1
        if parts <= 1 or numel < 2:
            pieces.append((name, index, 0, numel, tuple(p.shape), esize, numel))
            continue
        for start, stop in _split_ranges(numel, min(parts, numel)):
            pieces.append((name, index, start, stop, (stop - start,), esize, numel))
    if len(pieces) < num_servers:
        raise ConfigError(
            f"parallel.servers={num_servers} but the model has only {len(pieces)} parameter "
            f"chunks to place; use at most {len(pieces)} servers"
        )
    # Largest first; ties broken by parameter order so every rank builds the same plan.
    order = sorted(pieces, key=lambda p: (-(p[3] - p[2]) * p[5], p[1], p[2]))
    heap = [(0, s) for s in range(num_servers)]
    chunks: list[Chunk] = []
    for name, index, start, stop, shape, esize, full in order:
        load, server = heapq.heappop(heap)
        chunks.append(Chunk(name, index, start, stop, shape, esize, server, full))
        heapq.heappush(heap, (load + (stop - start) * esize, server))
    chunks.sort(key=lambda c: (c.server, c.index, c.start))
    return ShardPlan(num_servers, tuple(chunks))
