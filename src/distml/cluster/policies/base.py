"""The policy interface shared by the simulator and the live scheduler service.

A policy looks at a :class:`~distml.cluster.state.ClusterState` at time ``now``
and returns decisions (start, suspend, resume, migrate, pack, unpack, grow,
shrink), each with a reason; it never mutates the state. Because the state is
the same object in simulated and real time, one policy class serves both.
Policies stay incremental by reading the state's change journal
(:meth:`Policy.changed_jobs`) instead of rescanning every job at every event,
and may ask to be called again at a given time (:meth:`Policy.next_wakeup`),
e.g. when a quantum expires or a job crosses a priority threshold.

The owner of the state (simulator or live service) follows one protocol:
``add_job`` on submission; ``schedule`` on arrivals, completions and wake-ups;
carry out and ``apply`` the decisions in order (stopping at the first one that
fails, then scheduling again); ``set_throughput`` when a job's normalized speed
is measured; ``finish`` when a job exits; ``next_wakeup`` to arm a timer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from distml.cluster.decisions import (
    Decision,
    Grow,
    Migrate,
    Pack,
    Placement,
    Preempt,
    Resume,
    Shrink,
    Start,
    Suspend,
    Unpack,
)
from distml.cluster.state import ClusterState, Job, JobStatus

__all__ = [
    "Decision",
    "Grow",
    "Migrate",
    "Pack",
    "Policy",
    "Preempt",
    "Resume",
    "Shrink",
    "Start",
    "Suspend",
    "Unpack",
    "launch",
]


class Policy(ABC):
    """Base class: subclasses implement :meth:`schedule` (and maybe :meth:`next_wakeup`)."""

    name: ClassVar[str] = "policy"

    def __init__(self) -> None:
        self._cursor = 0
        self._seen: dict[int, tuple[JobStatus, int]] = {}  # job -> (status, version) last seen

    @abstractmethod
    def schedule(self, state: ClusterState, now: float) -> list[Decision]:
        """Decisions to apply, in order, at time ``now``."""

    def next_wakeup(self, state: ClusterState, now: float) -> float | None:
        """When to call :meth:`schedule` again even if no job arrives or ends (None: never)."""
        return None

    def changed_jobs(self, state: ClusterState) -> list[tuple[Job, JobStatus | None]]:
        """Jobs changed since the previous call, each with the status this policy last saw.

        Each job appears once, in the order of its latest change, and only if its
        version moved since this policy last saw it, so policies may push index
        entries without creating duplicates. Finished jobs are reported once more
        and then forgotten.
        """
        self._cursor, ids = state.journal_since(self._cursor)
        changed: list[tuple[Job, JobStatus | None]] = []
        for job_id in dict.fromkeys(reversed(ids)):
            job = state.jobs.get(job_id)
            seen = self._seen.get(job_id)
            if job is None:
                self._seen.pop(job_id, None)
                continue
            if seen is not None and seen[1] == job.version:
                continue
            if job.status is JobStatus.DONE:
                self._seen.pop(job_id, None)
            else:
                self._seen[job_id] = (job.status, job.version)
            changed.append((job, seen[0] if seen is not None else None))
        changed.reverse()
        return changed


def launch(job: Job, placement: Placement, reason: str) -> Start | Resume:
    """Start a never-run job or resume a suspended one."""
    if job.status is JobStatus.QUEUED:
        return Start(job=job.job_id, placement=placement, reason=reason)
    return Resume(job=job.job_id, placement=placement, reason=reason)
