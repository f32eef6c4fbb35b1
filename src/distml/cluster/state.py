"""The abstract cluster state that scheduling policies read and decisions change.

One :class:`ClusterState` describes nodes with GPU slots and the jobs placed on
them, independent of whether time is simulated or real: the simulator drives it
with a :class:`SimulatedClock`, the live scheduler service with a
:class:`WallClock`. Policies only read it; :meth:`ClusterState.apply` is the
single place where decisions change it, and it rejects any decision that would
over-allocate a slot. A change journal lets policies keep incremental indices
(heaps, round-robin queues) instead of rescanning every job at every event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import Protocol

from distml.cluster.decisions import (
    Decision,
    Grow,
    InvalidDecision,
    Migrate,
    Pack,
    Placement,
    Resume,
    Shrink,
    Slot,
    Start,
    Suspend,
    Unpack,
)
from distml.errors import ConfigError, UserError


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUSPENDED = "suspended"
    DONE = "done"


class Clock(Protocol):
    def now(self) -> float: ...


class SimulatedClock:
    """Time that only moves when the simulator advances it."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance_to(self, t: float) -> None:
        if t < self.time:
            raise ValueError(f"simulated time cannot go back from {self.time} to {t}")
        self.time = t


class WallClock:
    """Real time in seconds since the epoch, for the live scheduler."""

    def now(self) -> float:
        return time.time()


class Job:
    """A job as the scheduler sees it; ``version`` changes on every status/placement change."""

    __slots__ = (
        "_service",
        "_since",
        "changed_at",
        "finish_time",
        "job_id",
        "max_gpus",
        "min_gpus",
        "num_gpus",
        "num_migrations",
        "num_preemptions",
        "placement",
        "start_time",
        "status",
        "submit_time",
        "throughput",
        "version",
    )

    def __init__(
        self,
        job_id: int,
        submit_time: float,
        num_gpus: int,
        min_gpus: int | None = None,
        max_gpus: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.submit_time = submit_time
        self.num_gpus = num_gpus
        self.min_gpus = num_gpus if min_gpus is None else min_gpus
        self.max_gpus = num_gpus if max_gpus is None else max_gpus
        self.status = JobStatus.QUEUED
        self.placement: Placement = ()
        # Normalized throughput in the current placement (1.0 = alone on one node), once measured.
        self.throughput: float | None = None
        self.version = 0
        self.start_time: float | None = None
        self.finish_time: float | None = None
        # When status, placement or slot-mates last changed (e.g. for starvation guards).
        self.changed_at = submit_time
        self.num_preemptions = 0
        self.num_migrations = 0
        self._service = 0.0
        self._since = 0.0

    @property
    def elastic(self) -> bool:
        return self.min_gpus < self.max_gpus

    @property
    def size(self) -> int:
        """GPUs held now, or requested while waiting."""
        return len(self.placement) if self.placement else self.num_gpus

    @property
    def waiting(self) -> bool:
        return self.status is JobStatus.QUEUED or self.status is JobStatus.SUSPENDED

    def attained_service(self, now: float) -> float:
        """GPU-seconds of allocation received so far (Tiresias' attained service)."""
        if self.status is JobStatus.RUNNING:
            return self._service + len(self.placement) * max(0.0, now - self._since)
        return self._service

    def nodes(self) -> set[int]:
        return {node for node, _ in self.placement}

    def __repr__(self) -> str:
        return f"Job({self.job_id}, {self.status.value}, gpus={self.num_gpus})"


PackingEstimator = Callable[[Job, Job], "tuple[float, float] | None"]


def min_nodes(num_gpus: int, gpus_per_node: int) -> int:
    """Fewest nodes that can hold ``num_gpus`` GPUs."""
    return -(-num_gpus // gpus_per_node)


class ClusterState:
    """Nodes x GPU slots, the jobs on them, and indices that keep policies incremental."""

    def __init__(self, num_nodes: int, gpus_per_node: int, clock: Clock | None = None) -> None:
        if num_nodes < 1 or gpus_per_node < 1:
            raise ConfigError(
                f"a cluster needs >= 1 node and >= 1 GPU per node, got {num_nodes} x "
                f"{gpus_per_node}; pass positive sizes"
            )
        self.num_nodes = num_nodes
        self.gpus_per_node = gpus_per_node
        self.clock: Clock = clock if clock is not None else WallClock()
        self.jobs: dict[int, Job] = {}
        # Optional model of packed throughput, e.g. the simulator's interference model.
        self.packing_estimator: PackingEstimator | None = None
        self._waiting: dict[int, None] = {}
        self._running: dict[int, None] = {}
        self._node_free: list[set[int]] = [set(range(gpus_per_node)) for _ in range(num_nodes)]
        # _buckets[c] holds the nodes with exactly c free slots (an ordered set), for placement.
        self._buckets: list[dict[int, None]] = [{} for _ in range(gpus_per_node + 1)]
        self._buckets[gpus_per_node] = dict.fromkeys(range(num_nodes))
        self._occupants: dict[Slot, list[int]] = {}
        self._node_jobs: list[dict[int, None]] = [{} for _ in range(num_nodes)]
        self._shared: dict[Slot, None] = {}
        self._free = num_nodes * gpus_per_node
        self._journal: list[int] = []
        self._pair_measured: dict[tuple[int, int], tuple[float, float]] = {}

    # ----------------------------------------------------------------- reads
    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def free_gpus(self) -> int:
        """Slots with no job at all."""
        return self._free

    @property
    def busy_gpus(self) -> int:
        return self.total_gpus - self._free

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def now(self) -> float:
        return self.clock.now()

    def waiting_jobs(self) -> Iterator[Job]:
        return (self.jobs[j] for j in self._waiting)

    def running_jobs(self) -> Iterator[Job]:
        return (self.jobs[j] for j in self._running)

    def node_free_slots(self, node: int) -> set[int]:
        """Free GPU indices of ``node`` (the live set: do not modify)."""
        return self._node_free[node]

    def free_buckets(self) -> list[dict[int, None]]:
        """``[c]`` = nodes with exactly ``c`` free slots (live: do not modify)."""
        return self._buckets

    def occupants(self, slot: Slot) -> tuple[int, ...]:
        return tuple(self._occupants.get(slot, ()))

    def slot_load(self, slot: Slot) -> int:
        """How many jobs run on ``slot`` (0, 1, or 2 when packed)."""
        return len(self._occupants.get(slot, ()))

    def shared_slots(self) -> list[Slot]:
        """Slots on which two packed jobs run."""
        return list(self._shared)

    def jobs_on_node(self, node: int) -> list[int]:
        return list(self._node_jobs[node])

    def journal_since(self, cursor: int) -> tuple[int, list[int]]:
        """Ids of jobs whose status, placement or slot-mates changed after ``cursor``."""
        return len(self._journal), self._journal[cursor:]

    def estimate_packed(self, a: Job, b: Job) -> tuple[float, float] | None:
        """Normalized throughputs of ``a`` and ``b`` packed together, if known or modelled."""
        measured = self._pair_measured.get((a.job_id, b.job_id))
        if measured is not None:
            return measured
        swapped = self._pair_measured.get((b.job_id, a.job_id))
        if swapped is not None:
            return swapped[1], swapped[0]
        if self.packing_estimator is not None:
            return self.packing_estimator(a, b)
        return None

    # ---------------------------------------------------------------- writes
    def add_job(
        self,
        job_id: int,
        submit_time: float,
        num_gpus: int,
        min_gpus: int | None = None,
        max_gpus: int | None = None,
    ) -> Job:
        """Submit a job; it waits in ``queued`` until a policy starts it."""
        if job_id in self.jobs:
            raise UserError(f"job id {job_id} is already in the cluster; submit with a new id")
        job = Job(job_id, submit_time, num_gpus, min_gpus, max_gpus)
        if not 1 <= job.min_gpus <= job.num_gpus <= job.max_gpus:
            raise UserError(
                f"job {job_id} asks for {num_gpus} GPUs with min {job.min_gpus} and max "
                f"{job.max_gpus}; need 1 <= min <= num_gpus <= max"
            )
        if job.min_gpus > self.total_gpus:
            raise UserError(
                f"job {job_id} needs {job.min_gpus} GPUs but the cluster has {self.total_gpus}; "
                "drop the job or add GPUs"
            )
        # An elastic job may ask for more than exists as long as its minimum fits.
        job.max_gpus = min(job.max_gpus, self.total_gpus)
        job.num_gpus = min(job.num_gpus, self.total_gpus)
        self.jobs[job_id] = job
        self._waiting[job_id] = None
        self._journal.append(job_id)
        return job

    def finish(self, job_id: int, now: float) -> Job:
        """Mark a job done (completed or cancelled), freeing its GPUs."""
        job = self._get(job_id)
        if job.status is JobStatus.DONE:
            raise InvalidDecision(f"job {job_id} is already done")
        if job.status is JobStatus.RUNNING:
            self._release(job, now)
            del self._running[job_id]
        else:
            del self._waiting[job_id]
        job.status = JobStatus.DONE
        job.finish_time = now
        self._touch(job, now)
        return job

    def forget(self, job_id: int) -> None:
        """Drop a finished job from memory (long-running services)."""
        if self._get(job_id).status is not JobStatus.DONE:
            raise InvalidDecision(f"job {job_id} is not done; only done jobs can be forgotten")
        del self.jobs[job_id]

    def set_throughput(self, job_id: int, throughput: float, now: float) -> None:
        """Record a measured normalized throughput (1.0 = alone on one node).

        On a shared slot a new value is a change policies must see (packing may
        have lost), so it is journaled; elsewhere it is only stored.
        """
        job = self._get(job_id)
        previous, job.throughput = job.throughput, throughput
        if len(job.placement) != 1:
            return
        mates = self._occupants.get(job.placement[0], [])
        if len(mates) != 2:
            return
        if previous != throughput:
            self._touch(job, now)
        a, b = (self.jobs[m] for m in mates)
        if a.throughput is not None and b.throughput is not None:
            self._pair_measured[(a.job_id, b.job_id)] = (a.throughput, b.throughput)

    def apply(self, decision: Decision, now: float) -> None:
        """Carry out one decision, or raise :class:`InvalidDecision` without changing anything."""
        job = self._get(decision.job)
        if isinstance(decision, Start | Resume):
            want = JobStatus.QUEUED if isinstance(decision, Start) else JobStatus.SUSPENDED
            self._expect(job, want, decision)
            self._check_size(job, len(decision.placement), decision)
            self._check_free(job, decision.placement, decision)
            self._launch(job, decision.placement, now)
        elif isinstance(decision, Suspend):
            self._expect(job, JobStatus.RUNNING, decision)
            self._suspend(job, now)
        elif isinstance(decision, Migrate):
            self._expect(job, JobStatus.RUNNING, decision)
            if len(decision.placement) != len(job.placement):
                raise InvalidDecision(f"{decision.describe()}: migration must keep the size")
            self._move(job, decision.placement, now, decision)
            job.num_migrations += 1
        elif isinstance(decision, Pack):
            self._pack(job, decision, now)
        elif isinstance(decision, Unpack):
            self._expect(job, JobStatus.RUNNING, decision)
            if len(job.placement) != 1 or job.placement[0] not in self._shared:
                raise InvalidDecision(f"{decision.describe()}: job is not on a shared slot")
            if decision.placement is None:
                self._suspend(job, now)
            else:
                self._move(job, decision.placement, now, decision)
                job.num_migrations += 1
        elif isinstance(decision, Grow | Shrink):
            self._resize(job, decision, now)
        else:
            raise InvalidDecision(f"unknown decision type {type(decision).__name__}")

    # ------------------------------------------------------------- internals
    def _get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise InvalidDecision(f"no job {job_id} in the cluster")
        return job

    def _touch(self, job: Job, now: float) -> None:
        job.version += 1
        job.changed_at = now
        self._journal.append(job.job_id)

    @staticmethod
    def _expect(job: Job, status: JobStatus, decision: Decision) -> None:
        if job.status is not status:
            raise InvalidDecision(
                f"{decision.describe()}: job is {job.status.value}, expected {status.value}"
            )

    def _check_size(self, job: Job, size: int, decision: Decision) -> None:
        if not job.min_gpus <= size <= job.max_gpus or (not job.elastic and size != job.num_gpus):
            raise InvalidDecision(
                f"{decision.describe()}: {size} GPUs outside [{job.min_gpus}, {job.max_gpus}]"
            )

    def _check_free(self, job: Job, placement: Placement, decision: Decision) -> None:
        if len(set(placement)) != len(placement):
            raise InvalidDecision(f"{decision.describe()}: placement repeats a slot")
        for slot in placement:
            node, gpu = slot
            if not (0 <= node < self.num_nodes and 0 <= gpu < self.gpus_per_node):
                raise InvalidDecision(f"{decision.describe()}: slot {slot} does not exist")
            mates = self._occupants.get(slot)
            if mates and mates != [job.job_id]:
                raise InvalidDecision(f"{decision.describe()}: slot {slot} is held by {mates}")

    def _settle(self, job: Job, now: float) -> None:
        job._service = job.attained_service(now)
        job._since = now

    def _occupy(self, job_id: int, slots: Iterable[Slot]) -> None:
        for slot in slots:
            node, gpu = slot
            mates = self._occupants.setdefault(slot, [])
            mates.append(job_id)
            if len(mates) == 1:
                self._set_free(node, gpu, free=False)
            else:
                self._shared[slot] = None
            self._node_jobs[node][job_id] = None

    def _vacate(self, job_id: int, slots: Iterable[Slot], now: float) -> None:
        for slot in slots:
            node, gpu = slot
            mates = self._occupants[slot]
            mates.remove(job_id)
            if not mates:
                del self._occupants[slot]
                self._set_free(node, gpu, free=True)
            else:
                self._shared.pop(slot, None)
                self._touch(self.jobs[mates[0]], now)  # its slot-mate left: speed changes
        for node in {n for n, _ in slots}:
            self._node_jobs[node].pop(job_id, None)

    def _set_free(self, node: int, gpu: int, *, free: bool) -> None:
        slots = self._node_free[node]
        del self._buckets[len(slots)][node]
        if free:
            slots.add(gpu)
            self._free += 1
        else:
            slots.discard(gpu)
            self._free -= 1
        self._buckets[len(slots)][node] = None

    def _launch(self, job: Job, placement: Placement, now: float) -> None:
        del self._waiting[job.job_id]
        self._running[job.job_id] = None
        job.status = JobStatus.RUNNING
        job.placement = tuple(placement)
        job.throughput = None
        job._since = now
        if job.start_time is None:
            job.start_time = now
        self._occupy(job.job_id, placement)
        self._touch(job, now)

    def _release(self, job: Job, now: float) -> None:
        self._settle(job, now)
        self._vacate(job.job_id, job.placement, now)
        job.placement = ()
        job.throughput = None

    def _suspend(self, job: Job, now: float) -> None:
        self._release(job, now)
        del self._running[job.job_id]
        self._waiting[job.job_id] = None
        job.status = JobStatus.SUSPENDED
        job.num_preemptions += 1
        self._touch(job, now)

    def _move(self, job: Job, placement: Placement, now: float, decision: Decision) -> None:
        self._check_free(job, placement, decision)
        self._settle(job, now)
        self._vacate(job.job_id, job.placement, now)
        job.placement = tuple(placement)
        job.throughput = None
        self._occupy(job.job_id, placement)
        self._touch(job, now)

    def _pack(self, job: Job, decision: Pack, now: float) -> None:
        host = self._get(decision.host)
        if not job.waiting:
            raise InvalidDecision(f"{decision.describe()}: job is {job.status.value}")
        if host.status is not JobStatus.RUNNING or host.placement != (decision.slot,):
            raise InvalidDecision(f"{decision.describe()}: host does not run alone on the slot")
        if job.max_gpus != 1 or host.max_gpus != 1:
            raise InvalidDecision(f"{decision.describe()}: only 1-GPU jobs can be packed")
        if self._occupants.get(decision.slot) != [host.job_id]:
            raise InvalidDecision(f"{decision.describe()}: slot is already shared")
        self._launch(job, (decision.slot,), now)
        host.throughput = None
        self._touch(host, now)

    def _resize(self, job: Job, decision: Grow | Shrink, now: float) -> None:
        self._expect(job, JobStatus.RUNNING, decision)
        new, old = decision.placement, job.placement
        if not job.min_gpus <= len(new) <= job.max_gpus:
            raise InvalidDecision(
                f"{decision.describe()}: size outside [{job.min_gpus}, {job.max_gpus}]"
            )
        if isinstance(decision, Grow) and len(new) <= len(old):
            raise InvalidDecision(f"{decision.describe()}: grow must add GPUs")
        if isinstance(decision, Shrink) and (len(new) >= len(old) or not set(new) <= set(old)):
            raise InvalidDecision(f"{decision.describe()}: shrink must keep a strict subset")
        self._move(job, new, now, decision)
