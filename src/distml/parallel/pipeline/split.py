"""Where to cut a model into pipeline stages, and which plans are valid.

Stages are contiguous runs of transformer blocks; the first also holds the
embeddings and the last the final norm, LM head and loss. :func:`partition`
minimises the most expensive stage (the pipeline's pace) given a cost per
block, by dynamic programming over the cut positions. Costs are parameter
counts (a memory balance, ``pp_balance=params``) or measured forward+backward
seconds per block (``pp_balance=time``); :func:`bounds_from_split_points`
takes user-named cuts instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from distml.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
BALANCES = ("params", "time")


def check_pipeline_plan(
    n_blocks: int, pp: int, schedule: str, microbatches: int, virtual_stages: int = 1
) -> None:
    """One-line ConfigError for a plan the schedules cannot run."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown pipeline schedule {schedule!r} (parallel.pp_schedule); "
            f"choose one of: {', '.join(SCHEDULES)}"
        )
    if pp < 1 or virtual_stages < 1 or microbatches < 1:
        raise ConfigError(
            "parallel.pp, parallel.pp_virtual_stages and parallel.pp_microbatches must be "
            f"positive, got {pp}, {virtual_stages} and {microbatches}"
        )
    if schedule == "interleaved-1f1b" and virtual_stages < 2:
        raise ConfigError(
            "parallel.pp_schedule=interleaved-1f1b needs parallel.pp_virtual_stages >= 2 "
            "(stages per rank); set it, or use pp_schedule=1f1b"
        )
    if schedule != "interleaved-1f1b" and virtual_stages != 1:
        raise ConfigError(
            f"parallel.pp_virtual_stages={virtual_stages} needs parallel.pp_schedule="
            f"interleaved-1f1b; set virtual_stages=1 for {schedule}"
        )
    stages = pp * virtual_stages
    if stages > n_blocks:
        what = (
            f"parallel.pp={pp}"
            if virtual_stages == 1
            else (f"parallel.pp x virtual_stages = {pp} x {virtual_stages} = {stages} stages")
        )
        raise ConfigError(
            f"{what} exceeds the model's {n_blocks} transformer blocks (each stage needs one); "
            "lower parallel.pp or raise model.args.n_layer"
        )
    if schedule == "1f1b" and microbatches < pp:
        raise ConfigError(
            f"parallel.pp_microbatches={microbatches} is less than parallel.pp={pp}; the 1f1b "
            f"schedule needs at least one micro-batch per stage: set pp_microbatches >= {pp} "
            "or use pp_schedule=gpipe"
        )
    if schedule == "interleaved-1f1b":
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ConfigError(
                f"parallel.pp_microbatches={microbatches} is not a multiple of "
                f"max(1, microbatches // pp) = {rounds} as interleaved-1f1b requires; "
                f"use a multiple of parallel.pp={pp}"
            )


def partition(
    costs: Sequence[float], stages: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> list[range]:
    """Contiguous, non-empty block ranges per stage minimising the largest stage cost.

    ``first_extra``/``last_extra`` are the costs the first and last stage carry
    besides their blocks (embeddings; final norm, head and loss).
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(k: int, lo: int, hi: int) -> float:
        extra = (first_extra if k == 0 else 0.0) + (last_extra if k == stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    # best[k][i]: smallest achievable max cost putting blocks [0, i) into stages 0..k.
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = stage_cost(0, 0, i)
    for k in range(1, stages):
        for i in range(k + 1, n + 1):
            for j in range(k, i):
                value = max(best[k - 1][j], stage_cost(k, j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds: list[range] = []
    hi = n
    for k in range(stages - 1, 0, -1):
        lo = cut[k][hi]
        bounds.append(range(lo, hi))
        hi = lo
    bounds.append(range(0, hi))
    return bounds[::-1]


def bounds_from_split_points(
    split_points: Sequence[int | str], n_blocks: int, stages: int
) -> list[range]:
    """Stage ranges from the blocks that start stages 1..S-1 (``3`` or ``"blocks.3"``)."""
    starts: list[int] = []
    for point in split_points:
        text = str(point).removeprefix("blocks.")
        if not text.isdigit():
            raise ConfigError(
                f"pipeline split point {point!r} (parallel.pp_split_points) is not a block "
                "index; name the first block of each stage after the first, e.g. [2, 4] or "
                '["blocks.2", "blocks.4"]'
            )
        starts.append(int(text))
    if len(starts) != stages - 1:
        raise ConfigError(
            f"parallel.pp_split_points has {len(starts)} entries but {stages} stages need "
            f"{stages - 1}; list the first block of every stage but the first"
        )
    edges = [0, *starts, n_blocks]
    if any(a >= b for a, b in itertools.pairwise(edges)):
        raise ConfigError(
            f"parallel.pp_split_points {list(split_points)} must increase strictly within "
            f"1..{n_blocks - 1} so that every stage has a block"
        )
    return [range(a, b) for a, b in itertools.pairwise(edges)]
