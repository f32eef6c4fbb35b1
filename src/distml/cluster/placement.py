"""Consolidating placement over a scratch copy of the cluster's free slots.

A :class:`Planner` lets a policy plan several decisions in one scheduling
round (suspend these, then start that on the freed slots) without touching the
real state. Placement prefers as few nodes as possible: a job that fits in one
node goes to the node whose free slots fit it most tightly (best fit, which
keeps whole nodes free for large jobs); a job that cannot takes the emptiest
nodes first and best-fits the remainder. Node sets are copied on first write,
so a round that places little costs little.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from distml.cluster.decisions import Placement, Slot
from distml.cluster.state import ClusterState


class Planner:
    """Free slots as they will be after the decisions planned so far in this round."""

    def __init__(self, state: ClusterState) -> None:
        self._state = state
        self.gpus_per_node = state.gpus_per_node
        self._buckets = [bucket.copy() for bucket in state.free_buckets()]
        self._free: dict[int, set[int]] = {}
        self.free_gpus = state.free_gpus

    def node_free(self, node: int) -> set[int]:
        own = self._free.get(node)
        return own if own is not None else self._state.node_free_slots(node)

    def max_node_free(self) -> int:
        """Most free slots on any single node."""
        for count in range(self.gpus_per_node, 0, -1):
            if self._buckets[count]:
                return count
        return 0

    def nodes_with_free(self, count: int) -> list[int]:
        """Nodes with exactly ``count`` free slots."""
        return list(self._buckets[count])

    def place(self, num_gpus: int, exclude: Collection[int] = ()) -> Placement | None:
        """Slots for ``num_gpus`` GPUs on as few nodes as possible, or None if too few are free.

        Nothing is taken: call :meth:`take` with the result to commit it.
        """
        if num_gpus > self.free_gpus:
            return None
        chosen: list[Slot] = []
        used: set[int] = set(exclude)
        remaining = num_gpus
        while remaining > 0:
            node = self._best_fit(remaining, used)
            if node is not None:
                chosen.extend((node, gpu) for gpu in sorted(self.node_free(node))[:remaining])
                return tuple(chosen)
            node = self._emptiest(used)
            if node is None:
                return None
            gpus = sorted(self.node_free(node))
            chosen.extend((node, gpu) for gpu in gpus)
            used.add(node)
            remaining -= len(gpus)
        return tuple(chosen)

    def place_on(self, nodes: Iterable[int], num_gpus: int) -> list[Slot]:
        """Up to ``num_gpus`` free slots taken from ``nodes`` in order (for growing in place)."""
        chosen: list[Slot] = []
        for node in nodes:
            for gpu in sorted(self.node_free(node)):
                if len(chosen) == num_gpus:
                    return chosen
                chosen.append((node, gpu))
        return chosen

    def take(self, slots: Iterable[Slot]) -> None:
        for node, gpu in slots:
            free = self._writable(node)
            if gpu not in free:
                raise ValueError(f"slot {(node, gpu)} is not free in this plan")
            del self._buckets[len(free)][node]
            free.discard(gpu)
            self._buckets[len(free)][node] = None
            self.free_gpus -= 1

    def release(self, slots: Iterable[Slot]) -> None:
        for node, gpu in slots:
            free = self._writable(node)
            if gpu in free:
                raise ValueError(f"slot {(node, gpu)} is already free in this plan")
            del self._buckets[len(free)][node]
            free.add(gpu)
            self._buckets[len(free)][node] = None
            self.free_gpus += 1

    def _writable(self, node: int) -> set[int]:
        own = self._free.get(node)
        if own is None:
            own = set(self._state.node_free_slots(node))
            self._free[node] = own
        return own

    def _best_fit(self, num_gpus: int, exclude: Collection[int]) -> int | None:
        for count in range(num_gpus, self.gpus_per_node + 1):
            for node in self._buckets[count]:
                if node not in exclude:
                    return node
        return None

    def _emptiest(self, exclude: Collection[int]) -> int | None:
        for count in range(self.gpus_per_node, 0, -1):
            for node in self._buckets[count]:
                if node not in exclude:
                    return node
        return None


def nodes_spanned(placement: Iterable[Slot]) -> int:
    return len({node for node, _ in placement})
