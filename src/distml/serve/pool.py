"""The replica pool: routing, crash recovery and resizing of the model replicas.

Jobs go to the ready replica with the fewest jobs in flight (shortest queue);
with none ready they wait in a pending list. When a replica dies, each of its
in-flight jobs is retried once on another replica, unless it already streamed
tokens, and otherwise answered with :class:`JobFailed` (HTTP 503): nothing is
left hanging. A dead replica is restarted in its slot with a short backoff;
after three deaths in a row before becoming ready the pool stops restarting
and fails what waits. :meth:`ReplicaPool.scale_to` adds replicas or drains
surplus ones (no new jobs; stopped once idle).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distml.errors import UserError
from distml.serve.metrics import ServeMetrics
from distml.serve.replicas import ProcessReplica, Replica, ThreadReplica
from distml.serve.settings import ServeSettings

log = logging.getLogger("distml.serve")
_ids = itertools.count(1)
_MAX_ATTEMPTS = 2
_MAX_BOOT_FAILURES = 3

Result = tuple[dict[str, Any], list[np.ndarray]]


class JobFailed(Exception):
    """A job could not be answered; ``status`` is the HTTP status to give the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    kind: str
    params: dict[str, Any]
    arrays: list[np.ndarray]
    future: Future[Result] = field(default_factory=Future)
    #: Called from a pool thread with each streamed frame (e.g. a generated token).
    on_token: Callable[[dict[str, Any]], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    attempts: int = 0
    streamed: bool = False

    def message(self) -> dict[str, Any]:
        return {**self.params, "op": "job", "id": self.id, "kind": self.kind}


class ReplicaPool:
    def __init__(self, model_path: str, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.model_path = model_path
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.RLock()
        self._replicas: list[Replica] = []
        self._pending: deque[Job] = deque()
        self._ready_cv = threading.Condition(self._lock)
        self._closing = False
        self._boot_failures = 0
        self.fatal: str | None = None
        self.restarts = 0

    # ------------------------------------------------------------ lifecycle
    def _new_replica(self, index: int) -> Replica:
        s = self.settings
        if s.replicas == 0:
            return ThreadReplica(index, self, self.model_path, s.device, s.threads_per_replica)
        if s.model_parallel:
            from distml.serve.model_parallel import GroupReplica

            return GroupReplica(
                index,
                self,
                self.model_path,
                s.threads_per_replica,
                s.tp,
                s.pp,
                s.microbatches,
                s.max_batch_size,
            )
        return ProcessReplica(index, self, self.model_path, s.device, s.threads_per_replica)

    def start(self) -> None:
        self.scale_to(max(1, self.settings.replicas))

    def wait_ready(self, count: int, timeout: float) -> None:
        """Block until ``count`` replicas are ready; UserError on a load failure or timeout."""
        deadline = time.monotonic() + timeout
        with self._ready_cv:
            while self.ready_count() < count:
                if self.fatal is not None and self._boot_failures >= 1:
                    raise UserError(
                        f"a replica could not load the model ({self.fatal}); "
                        "check the model file and device"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UserError(
                        f"{self.ready_count()}/{count} replicas ready after {timeout:.0f}s; "
                        "raise startup_timeout_s or use fewer replicas"
                    )
                self._ready_cv.wait(min(left, 0.2))

    def close(self, drain_timeout: float = 10.0) -> None:
        """Wait for queued jobs (up to ``drain_timeout``), then stop every replica."""
        deadline = time.monotonic() + drain_timeout
        while self.load() > 0 and time.monotonic() < deadline and self.ready_count() > 0:
            time.sleep(0.02)
        with self._lock:
            self._closing = True
            replicas = list(self._replicas)
            for r in replicas:
                r.state = "stopping"
            left = list(self._pending)
            self._pending.clear()
        for job in left:
            self._fail(job, JobFailed(503, "server is shutting down; retry on another instance"))
        # Stop in parallel: each replica takes a moment to exit and they are independent.
        stoppers = [threading.Thread(target=r.stop, daemon=True) for r in replicas]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()

    # ------------------------------------------------------------ queries
    def ready_count(self) -> int:
        with self._lock:
            return sum(r.state == "ready" for r in self._replicas)

    def target_size(self) -> int:
        """Replicas that are or will be serving (starting or ready, not draining)."""
        with self._lock:
            return sum(r.state in ("starting", "ready") for r in self._replicas)

    def load(self) -> int:
        """Jobs waiting for a replica plus jobs in flight."""
        with self._lock:
            return len(self._pending) + sum(len(r.inflight) for r in self._replicas)

    def replica_list(self) -> list[Replica]:
        """A snapshot of the replicas (any state)."""
        with self._lock:
            return list(self._replicas)

    def busy_count(self) -> int:
        """Replicas with at least one job in flight."""
        with self._lock:
            return sum(bool(r.inflight) for r in self._replicas)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def pids(self) -> list[int]:
        with self._lock:
            return [r.pid for r in self._replicas if r.state == "ready" and r.pid is not None]

    # ------------------------------------------------------------ jobs
    def submit(self, job: Job) -> Future[Result]:
        with self._lock:
            if self._closing:
                self._fail(job, JobFailed(503, "server is shutting down"))
            elif self._boot_failures >= _MAX_BOOT_FAILURES:
                self._fail(job, JobFailed(503, f"no replica can start: {self.fatal}"))
            else:
                self._pending.append(job)
                self._dispatch()
        return job.future

    def _dispatch(self) -> None:
        ready = [r for r in self._replicas if r.state == "ready"]
        while self._pending and ready:
            job = self._pending.popleft()
            if job.future.done():  # the caller gave up (timeout)
                continue
            replica = min(ready, key=lambda r: (len(r.inflight), r.index))
            job.attempts += 1
            replica.inflight[job.id] = job
            replica.send(job.message(), job.arrays)

    def _fail(self, job: Job, error: JobFailed) -> None:
        # The caller may cancel (time out) at any moment, even between a check and a set.
        with contextlib.suppress(InvalidStateError):
            job.future.set_exception(error)

    # ------------------------------------------------------------ replica events
    def replica_ready(self, replica: Replica) -> None:
        with self._lock:
            if replica.state == "starting":
                replica.state = "ready"
            self._boot_failures = 0
            log.info("replica %d ready (pid %s)", replica.index, replica.pid)
            self._update_gauges()
            self._dispatch()
            self._ready_cv.notify_all()

    def replica_message(
        self, replica: Replica, message: dict[str, Any], arrays: list[np.ndarray]
    ) -> None:
        op = message.get("op")
        if op == "fatal":
            with self._lock:
                self.fatal = str(message.get("error"))
            return
        with self._lock:
            job = replica.inflight.get(int(message.get("id", -1)))
            if job is None:
                return
            if op == "token":
                job.streamed = True
            else:
                del replica.inflight[job.id]
                self._maybe_retire(replica)
                self._dispatch()
        if op == "token":
            if job.on_token is not None:
                job.on_token(message)
        elif op == "error":
            self._fail(job, JobFailed(int(message.get("status", 500)), str(message.get("error"))))
        else:
            with contextlib.suppress(InvalidStateError):
                job.future.set_result((message, arrays))

    def replica_exited(self, replica: Replica, reason: str) -> None:
        with self._lock:
            expected = replica.state == "stopping"
            was_ready = replica.state in ("ready", "draining")
            if replica in self._replicas:
                self._replicas.remove(replica)
            orphans = list(replica.inflight.values())
            replica.inflight.clear()
            retry: list[Job] = []
            for job in orphans:
                if job.attempts < _MAX_ATTEMPTS and not job.streamed:
                    retry.append(job)
                else:
                    self._fail(job, JobFailed(503, f"replica {replica.index} died ({reason})"))
            self._pending.extendleft(reversed(retry))
            restart = not expected and not self._closing and replica.state != "draining"
            if not expected:
                log.warning(
                    "replica %d %s; %d job(s) retried, %d failed",
                    replica.index,
                    reason,
                    len(retry),
                    len(orphans) - len(retry),
                )
                if not was_ready:
                    self._boot_failures += 1
            give_up = self._boot_failures >= _MAX_BOOT_FAILURES
            if restart and give_up:
                waiting = list(self._pending)
                self._pending.clear()
                for job in waiting:
                    self._fail(job, JobFailed(503, f"no replica can start: {self.fatal or reason}"))
            self._update_gauges()
            self._dispatch()
            self._ready_cv.notify_all()
        if restart and not give_up:
            time.sleep(min(2.0, 0.2 * self._boot_failures))
            with self._lock:
                if self._closing:
                    return
                fresh = self._new_replica(replica.index)
                self._replicas.append(fresh)
                self.restarts += 1
                self.metrics.replica_restarts.inc()
                self._update_gauges()
            fresh.start()

    # ------------------------------------------------------------ scaling
    def scale_to(self, count: int) -> int:
        """Add replicas or mark surplus ones draining; returns the change in serving replicas."""
        to_start: list[Replica] = []
        with self._lock:
            if self._closing:
                return 0
            serving = [r for r in self._replicas if r.state in ("starting", "ready")]
            delta = count - len(serving)
            used = {r.index for r in self._replicas}
            free = (i for i in itertools.count() if i not in used)
            for _ in range(max(0, delta)):
                replica = self._new_replica(next(free))
                self._replicas.append(replica)
                to_start.append(replica)
            # Drain the least busy first; a starting replica has nothing to finish.
            victims = sorted(serving, key=lambda r: (r.state == "ready", len(r.inflight), -r.index))
            for replica in victims[: max(0, -delta)]:
                replica.state = "draining"
                self._maybe_retire(replica)
            self._update_gauges()
        for replica in to_start:
            replica.start()
        return delta

    def _maybe_retire(self, replica: Replica) -> None:
        if replica.state == "draining" and not replica.inflight:
            replica.state = "stopping"
            # Joining a process takes time: never on the caller's (maybe the event loop's) thread.
            threading.Thread(target=replica.stop, daemon=True).start()

    def _update_gauges(self) -> None:
        self.metrics.replicas.set(sum(r.state == "ready" for r in self._replicas))
        self.metrics.replicas_target.set(
            sum(r.state in ("starting", "ready") for r in self._replicas)
        )
