"""DDP communication hook that averages gradient buckets with a chosen all-reduce algorithm.

``model.register_comm_hook(*allreduce_algorithm_hook("ring"))`` makes
DistributedDataParallel reduce every gradient bucket with one of distml's
point-to-point algorithms (ring, halving-doubling, tree or hierarchical)
instead of the backend's built-in all-reduce, keeping DDP's semantics: each
rank receives the average of all ranks' gradients.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distml.comm.collectives import ALL_REDUCE_ALGORITHMS
from distml.comm.hierarchical import HierarchicalAllReduce, host_groups_from_env
from distml.errors import ConfigError

HOOK_ALGORITHMS = (*ALL_REDUCE_ALGORITHMS, "hierarchical")


@dataclass
class AlgorithmHookState:
    """What the hook needs per bucket: the algorithm and where it runs."""

    algorithm: str
    group: dist.ProcessGroup | None = None
    hierarchical: HierarchicalAllReduce | None = None


def algorithm_allreduce_hook(
    state: AlgorithmHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket``'s flat gradient buffer in place and return it as a completed future."""
    buffer = bucket.buffer()
    if state.hierarchical is not None:
        state.hierarchical(buffer, "avg")
    else:
        ALL_REDUCE_ALGORITHMS[state.algorithm](buffer, "avg", state.group)
    # A CUDA future records the current stream so DDP's consumer waits for the p2p kernels.
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future(
        devices=[buffer.device] if buffer.is_cuda else None
    )
    future.set_result(buffer)
    return future


def allreduce_algorithm_hook(
    algorithm: str,
    group: dist.ProcessGroup | None = None,
    host_groups: Sequence[Sequence[int]] | None = None,
) -> tuple[AlgorithmHookState, Callable[..., torch.futures.Future[torch.Tensor]]]:
    """``(state, hook)`` for ``model.register_comm_hook``; call it on every rank.

    ``group`` must be the group DDP was built with (None: the default group).
    ``"hierarchical"`` works on the default group only and builds its subgroups
    here, from ``host_groups`` or else from LOCAL_WORLD_SIZE.
    """
    if algorithm not in HOOK_ALGORITHMS:
        raise ConfigError(
            f"unknown all-reduce algorithm {algorithm!r}; use one of {', '.join(HOOK_ALGORITHMS)}"
        )
    if algorithm != "hierarchical":
        return AlgorithmHookState(algorithm, group), algorithm_allreduce_hook
    if group is not None:
        raise ConfigError(
            "the hierarchical hook runs on the default process group; drop the group argument"
        )
    groups = host_groups if host_groups is not None else host_groups_from_env()
    state = AlgorithmHookState(algorithm, None, HierarchicalAllReduce(groups))
    return state, algorithm_allreduce_hook
