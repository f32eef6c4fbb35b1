"""Tiresias-style discretized two-dimensional least-attained-service (2D-LAS).

A job's attained service is GPUs x seconds of allocation (both dimensions of
Tiresias' 2D-LAS). ``thresholds`` cut it into K priority queues: a job starts
in queue 0 and moves down as it crosses each threshold. Higher queues win;
within a queue jobs run in FIFO order of submission. A waiting job preempts
(suspend-to-checkpoint) running jobs only from strictly lower queues, so jobs of
the same queue never thrash each other. An optional starvation guard promotes
a job back to queue 0 after it has waited ``starvation_limit`` seconds.

Everything is incremental: heaps of waiting jobs (best first), running jobs
(worst first) and threshold crossings, validated lazily against job versions.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

from distml.cluster.decisions import Decision, Suspend
from distml.cluster.placement import Planner
from distml.cluster.policies.base import Policy, launch
from distml.cluster.state import ClusterState, Job, JobStatus
from distml.errors import ConfigError

# Tolerance so a job sitting exactly on a threshold counts as having crossed it.
_EPS = 1e-6


class LasPolicy(Policy):
    """Discretized 2D-LAS with K = len(thresholds) + 1 queues."""

    name = "las"

    def __init__(
        self,
        thresholds: Sequence[float] = (3600.0, 36000.0),
        starvation_limit: float | None = None,
        lookahead: int = 64,
    ) -> None:
        super().__init__()
        limits = [float(t) for t in thresholds]
        if any(t <= 0 for t in limits) or limits != sorted(set(limits)):
            raise ConfigError(
                f"las thresholds must be positive and strictly increasing GPU-seconds, got "
                f"{list(thresholds)}; e.g. thresholds=[3600, 36000]"
            )
        if starvation_limit is not None and starvation_limit <= 0:
            raise ConfigError(
                f"las starvation_limit must be > 0 seconds or None, got {starvation_limit}"
            )
        if lookahead < 1:
            raise ConfigError(f"las lookahead must be >= 1, got {lookahead}")
        self.thresholds = tuple(limits)
        self.starvation_limit = starvation_limit
        self.lookahead = lookahead
        self._level: dict[int, int] = {}
        self._forgiven: dict[int, float] = {}  # service written off by starvation promotions
        self._waiting: list[tuple[int, float, int, int]] = []  # (level, submit, id, version)
        self._running: list[tuple[int, float, int, int, int]] = []  # worst first
        self._crossings: list[tuple[float, int, int, int]] = []  # (time, id, version, level)
        self._starving: list[tuple[float, int, int]] = []  # (promotion time, id, version)

    @property
    def num_queues(self) -> int:
        return len(self.thresholds) + 1

    def queue_of(self, job: Job, now: float) -> int:
        """The priority queue (0 = highest) that ``job`` belongs to at ``now``."""
        service = job.attained_service(now) - self._forgiven.get(job.job_id, 0.0)
        return bisect.bisect_right(self.thresholds, service + _EPS)

    def schedule(self, state: ClusterState, now: float) -> list[Decision]:
        self._sync(state, now)
        self._demote(state, now)
        self._promote_starving(state, now)
        decisions: list[Decision] = []
        planner = Planner(state)
        skipped: list[tuple[int, float, int, int]] = []
        while self._waiting and len(skipped) < self.lookahead:
            entry = self._waiting[0]
            level, _, job_id, _ = entry
            job = self._valid_waiting(state, entry)
            if job is None:
                heapq.heappop(self._waiting)
                continue
            victims = self._victims(state, level, job.num_gpus - planner.free_gpus)
            if victims is None:
                heapq.heappop(self._waiting)
                skipped.append(entry)
                if planner.free_gpus == 0 and not self._has_victim_below(state, level):
                    break  # later waiting jobs are in this queue or worse: none can start
                continue
            for victim, victim_level in victims:
                planner.release(victim.placement)
                decisions.append(
                    Suspend(
                        job=victim.job_id,
                        reason=f"preempted by job {job_id} (queue {level} beats queue "
                        f"{victim_level})",
                    )
                )
            placement = planner.place(job.num_gpus)
            assert placement is not None  # enough slots are free by construction
            planner.take(placement)
            heapq.heappop(self._waiting)
            decisions.append(
                launch(job, placement, f"highest-priority waiting job (queue {level})")
            )
        for entry in skipped:
            heapq.heappush(self._waiting, entry)
        return decisions

    def next_wakeup(self, state: ClusterState, now: float) -> float | None:
        self._sync(state, now)  # jobs started this round cross thresholds too
        times: list[float] = []
        while self._crossings:
            when, job_id, version, level = self._crossings[0]
            job = state.jobs.get(job_id)
            if job is not None and job.version == version and self._level.get(job_id) == level:
                times.append(when)
                break
            heapq.heappop(self._crossings)
        while self._starving:
            when, job_id, version = self._starving[0]
            job = state.jobs.get(job_id)
            if job is not None and job.version == version and self._level.get(job_id, 0) > 0:
                times.append(when)
                break
            heapq.heappop(self._starving)
        return min(times) if times else None

    # ------------------------------------------------------------- internals
    def _sync(self, state: ClusterState, now: float) -> None:
        for job, _ in self.changed_jobs(state):
            job_id = job.job_id
            if job.status is JobStatus.DONE:
                self._level.pop(job_id, None)
                self._forgiven.pop(job_id, None)
                continue
            level = self.queue_of(job, now)
            self._level[job_id] = level
            if job.waiting:
                self._push_waiting(job, level)
                if self.starvation_limit is not None and level > 0:
                    when = job.changed_at + self.starvation_limit
                    heapq.heappush(self._starving, (when, job_id, job.version))
            else:
                self._push_running(job, level, now)

    def _push_waiting(self, job: Job, level: int) -> None:
        heapq.heappush(self._waiting, (level, job.submit_time, job.job_id, job.version))

    def _push_running(self, job: Job, level: int, now: float) -> None:
        entry = (-level, -job.submit_time, -job.job_id, job.version, level)
        heapq.heappush(self._running, entry)
        if level < len(self.thresholds):
            service = job.attained_service(now) - self._forgiven.get(job.job_id, 0.0)
            when = now + max(0.0, self.thresholds[level] - service) / len(job.placement)
            heapq.heappush(self._crossings, (when, job.job_id, job.version, level))

    def _demote(self, state: ClusterState, now: float) -> None:
        while self._crossings and self._crossings[0][0] <= now:
            _, job_id, version, level = heapq.heappop(self._crossings)
            job = state.jobs.get(job_id)
            if job is None or job.version != version or self._level.get(job_id) != level:
                continue
            new_level = max(level + 1, self.queue_of(job, now))
            self._level[job_id] = new_level
            self._push_running(job, new_level, now)

    def _promote_starving(self, state: ClusterState, now: float) -> None:
        while self._starving and self._starving[0][0] <= now:
            _, job_id, version = heapq.heappop(self._starving)
            job = state.jobs.get(job_id)
            if job is None or job.version != version or not job.waiting:
                continue
            self._forgiven[job_id] = job.attained_service(now)
            self._level[job_id] = 0
            self._push_waiting(job, 0)

    def _valid_waiting(self, state: ClusterState, entry: tuple[int, float, int, int]) -> Job | None:
        level, _, job_id, version = entry
        job = state.jobs.get(job_id)
        if job is None or job.version != version or self._level.get(job_id) != level:
            return None
        return job

    def _has_victim_below(self, state: ClusterState, level: int) -> bool:
        victims = self._victims(state, level, 1)
        if victims:
            self._push_back(victims)
        return victims is not None

    def _push_back(self, victims: list[tuple[Job, int]]) -> None:
        for job, level in victims:
            entry = (-level, -job.submit_time, -job.job_id, job.version, level)
            heapq.heappush(self._running, entry)

    def _victims(
        self, state: ClusterState, level: int, shortfall: int
    ) -> list[tuple[Job, int]] | None:
        """Worst running jobs from queues below ``level`` freeing ``shortfall`` GPUs, or None."""
        victims: list[tuple[Job, int]] = []
        freed = 0
        while freed < shortfall and self._running:
            entry = self._running[0]
            job = state.jobs.get(-entry[2])
            victim_level = entry[4]
            if (
                job is None
                or job.version != entry[3]
                or self._level.get(job.job_id) != victim_level
                or job.status is not JobStatus.RUNNING
            ):
                heapq.heappop(self._running)
                continue
            if victim_level <= level:
                break
            heapq.heappop(self._running)
            victims.append((job, victim_level))
            freed += len(job.placement)
        if freed < shortfall:
            self._push_back(victims)
            return None
        return victims
