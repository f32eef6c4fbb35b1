"""Two-level (host-aware) all-reduce over point-to-point messages.

Ranks on one host share fast links (NVLink, shared memory) while hosts talk
over a slower network, so :class:`HierarchicalAllReduce` reduces inside each
host to its leader (the host's lowest rank), ring-all-reduces among the
leaders only, then broadcasts inside each host. Only ``n`` bytes per host
cross the network instead of ``n`` per process. The subgroups are built once,
when the object is created on every rank; the helpers here derive the host
layout from the launcher's environment.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

from distml.comm.collectives import (
    ReduceOpLike,
    all_gather,
    backend_device,
    flattened,
    group_view,
    normalize_op,
    ring_all_reduce_flat,
    tree_broadcast_flat,
    tree_reduce_flat,
)
from distml.errors import ConfigError, UserError


def host_groups_from_env(
    world_size: int | None = None, local_world_size: int | None = None
) -> list[list[int]]:
    """Global ranks per host, assuming the launcher numbers each host's ranks contiguously.

    torchrun gives every node LOCAL_WORLD_SIZE consecutive ranks, so ranks ``r``
    with equal ``r // LOCAL_WORLD_SIZE`` share a host. Arguments default to the
    default group's size (else WORLD_SIZE) and the LOCAL_WORLD_SIZE variable.
    """
    if world_size is not None:
        world = world_size
    elif dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    local = (
        local_world_size
        if local_world_size is not None
        else int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    )
    if local < 1 or world < 1 or world % local != 0:
        raise ConfigError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}; start the same "
            "number of processes on every host or pass host_groups explicitly"
        )
    return [list(range(start, start + local)) for start in range(0, world, local)]


def _host_key() -> int:
    """This process's host id: the launcher's node rank, else a hash of the host name."""
    node = os.environ.get("GROUP_RANK")
    if node not in (None, ""):
        return int(node)
    digest = hashlib.blake2b(socket.gethostname().encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


def discover_host_groups() -> list[list[int]]:
    """Host groups of the default process group found by exchanging host ids (a collective).

    Unlike :func:`host_groups_from_env` this works when hosts run different
    numbers of processes or ranks are not numbered host by host. Every rank
    must call it.
    """
    mine = torch.tensor([_host_key()], dtype=torch.int64, device=backend_device())
    keys = [int(t.item()) for t in all_gather(mine)]
    groups: dict[int, list[int]] = {}
    for rank, key in enumerate(keys):
        groups.setdefault(key, []).append(rank)
    return sorted(groups.values())


def _validate(host_groups: Sequence[Sequence[int]], world: int) -> list[list[int]]:
    groups = [sorted(int(r) for r in host) for host in host_groups]
    flat = sorted(r for host in groups for r in host)
    if any(not host for host in groups) or flat != list(range(world)):
        raise ConfigError(
            f"host_groups {[list(h) for h in host_groups]} must split ranks 0..{world - 1} "
            "into non-empty hosts, each rank exactly once"
        )
    return sorted(groups)


class HierarchicalAllReduce:
    """Reusable host-aware all-reduce; build it on every rank, in the same order.

    Construction calls ``dist.new_group`` once per host and once for the
    leaders, which every rank of the default group must do together.
    """

    def __init__(self, host_groups: Sequence[Sequence[int]]) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise UserError(
                "torch.distributed is not initialized; call distml.runtime.init_distributed() "
                "before building HierarchicalAllReduce"
            )
        self.world_size = dist.get_world_size()
        self.host_groups = _validate(host_groups, self.world_size)
        me = dist.get_rank()
        self._owned: list[dist.ProcessGroup] = []
        self._host_group: dist.ProcessGroup | None = None
        for host in self.host_groups:
            pg = dist.new_group(ranks=host)
            if me in host:
                self._host_group = pg
                self._owned.append(pg)
        leaders = [host[0] for host in self.host_groups]
        leader_pg = dist.new_group(ranks=leaders)
        self.is_leader = me in leaders
        self._leader_group = leader_pg if self.is_leader else None
        if self._leader_group is not None:
            self._owned.append(self._leader_group)

    def __call__(self, tensor: torch.Tensor, op: ReduceOpLike = "sum") -> torch.Tensor:
        """All-reduce ``tensor`` in place across every rank of the job."""
        if self._host_group is None:
            raise UserError("this HierarchicalAllReduce was closed; build a new one to continue")
        name = normalize_op(op, tensor.dtype)
        partial = "sum" if name == "avg" else name
        host = group_view(self._host_group, tensor.device)
        with flattened(tensor) as flat:
            tree_reduce_flat(flat, partial, 0, host)
            if self._leader_group is not None:
                leaders = group_view(self._leader_group, tensor.device)
                ring_all_reduce_flat(flat, partial, leaders)
                if name == "avg":
                    flat.div_(self.world_size)
            tree_broadcast_flat(flat, 0, host)
        return tensor

    def close(self) -> None:
        """Destroy the subgroups this rank belongs to; the object is unusable afterwards."""
        for pg in self._owned:
            dist.destroy_process_group(pg)
        self._owned.clear()
        self._host_group = self._leader_group = None


def hierarchical_all_reduce(
    tensor: torch.Tensor, host_groups: Sequence[Sequence[int]], op: ReduceOpLike = "sum"
) -> torch.Tensor:
    """One-shot hierarchical all-reduce in place; every rank must call it.

    It creates and destroys the subgroups on each call; for repeated use (a
    training loop) build one :class:`HierarchicalAllReduce` instead.
    """
    algorithm = HierarchicalAllReduce(host_groups)
    try:
        return algorithm(tensor, op)
    finally:
        algorithm.close()
