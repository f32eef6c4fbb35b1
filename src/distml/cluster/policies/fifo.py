"""First-in first-out: start jobs in submission order, never preempt.

The head of the queue blocks the jobs behind it (no backfilling), which is the
classic baseline that Tiresias and Gandiva are measured against. Placement is
consolidated (fewest nodes, best fit).
"""

from __future__ import annotations

import heapq

from distml.cluster.decisions import Decision
from distml.cluster.placement import Planner
from distml.cluster.policies.base import Policy, launch
from distml.cluster.state import ClusterState


class FifoPolicy(Policy):
    """Strict FIFO by submit time (ties by job id)."""

    name = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[tuple[float, int, int]] = []  # (submit time, job id, version)

    def schedule(self, state: ClusterState, now: float) -> list[Decision]:
        for changed, _ in self.changed_jobs(state):
            if changed.waiting:
                heapq.heappush(self._queue, (changed.submit_time, changed.job_id, changed.version))
        decisions: list[Decision] = []
        planner: Planner | None = None
        while self._queue:
            _, job_id, version = self._queue[0]
            job = state.jobs.get(job_id)
            if job is None or job.version != version or not job.waiting:
                heapq.heappop(self._queue)
                continue
            free = planner.free_gpus if planner is not None else state.free_gpus
            if job.num_gpus > free:
                break
            if planner is None:
                planner = Planner(state)
            placement = planner.place(job.num_gpus)
            if placement is None:
                break
            planner.take(placement)
            heapq.heappop(self._queue)
            decisions.append(launch(job, placement, "first in the FIFO queue"))
        return decisions
