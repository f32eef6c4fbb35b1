"""The live scheduler: one thread that drives a policy over real job processes.

It follows the policy protocol of :mod:`distml.cluster.policies.base` with a
wall clock: jobs join the :class:`~distml.cluster.state.ClusterState` on
submission; ``schedule`` runs on arrivals, exits, measurements and the
policy's wake-up times; decisions are applied in order and logged as events
with their reasons; then carried out by the executor -- every run that must
stop (suspend, migrate, unpack, grow, shrink) is signalled to checkpoint and
waited for first, then every job that should run and has no process is
started on its (new) placement with ``--resume``. Measured throughput of
packed pairs, normalized by solo rates, goes back to the state.

A run that has not yet trained ``min_run_s`` seconds (start-up excluded) is
not preempted: the decision is deferred and the policy asked again later, so
time slices are never spent importing torch. Only this thread touches the
cluster state; API threads write new jobs to the store and post requests.
On start, jobs the store marks running are re-attached when their process is
still alive (same pid and start time) and resumed from their checkpoints
otherwise, so a scheduler restart loses no job.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distml.cluster.decisions import (
    Decision,
    Grow,
    InvalidDecision,
    Migrate,
    Pack,
    Placement,
    Shrink,
    Start,
    Suspend,
    Unpack,
)
from distml.cluster.placement import Planner
from distml.cluster.policies.base import Policy
from distml.cluster.service.executor import (
    Executor,
    Exit,
    JobFiles,
    JobProcess,
    LaunchRequest,
    classify_exit,
    prepare_run,
)
from distml.cluster.service.jobspec import ResolvedJob
from distml.cluster.service.store import ACTIVE, TERMINAL, JobRecord, Store
from distml.cluster.service.throughput import (
    SOLO,
    RunMonitor,
    SoloRates,
    last_step_record,
    training_signature,
)
from distml.cluster.state import Clock, ClusterState, JobStatus, WallClock
from distml.errors import UserError

# Priority moves a job ahead of every lower-priority job in submission order.
PRIORITY_SPAN = 1e9
_STOPPING = (Suspend, Migrate, Unpack, Grow, Shrink)


class JobNotFound(UserError):
    """No job with that id or name (HTTP 404)."""


class JobConflict(UserError):
    """The job is not in a state that allows the request (HTTP 409)."""


@dataclass
class SchedulerOptions:
    #: A run is not preempted before it has trained this long (start-up excluded) ...
    min_run_s: float = 10.0
    #: ... and this many steps.
    min_run_steps: int = 0
    #: A run still without a training step after this long may be preempted anyway.
    start_grace_s: float = 300.0
    #: How long a stopping run may take to checkpoint before it is killed.
    stop_timeout_s: float = 60.0
    tick_s: float = 0.25
    #: Steps and seconds of a context needed before its rate counts as measured.
    measure_steps: int = 5
    measure_seconds: float = 2.0


@dataclass
class _Live:
    proc: JobProcess
    monitor: RunMonitor
    launched: float
    persisted_step: int | None = None
    persisted_at: float = 0.0


@dataclass
class _Request:
    kind: str
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)


class Scheduler:
    """Owns the cluster state, the policy and the runs; thread-safe entry points below."""

    def __init__(
        self,
        store: Store,
        executor: Executor,
        policy: Policy,
        num_slots: int,
        state_dir: str | Path,
        options: SchedulerOptions | None = None,
        policy_name: str = "",
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.policy = policy
        self.policy_name = policy_name or policy.name
        self.num_slots = num_slots
        self.state_dir = Path(state_dir)
        self.options = options or SchedulerOptions()
        # Seconds since the epoch; a SimulatedClock makes rates and guards testable.
        self.clock: Clock = clock if clock is not None else WallClock()
        self.state = ClusterState(1, num_slots, self.clock)
        self._live: dict[int, _Live] = {}
        self._signatures: dict[int, str] = {}
        self._solo = SoloRates()
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stop = False
        self._dirty = True
        self._wakeup: float | None = None
        self._noted: set[tuple[int, str, int, str]] = set()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # ------------------------------------------------------- thread-safe API
    def start(self, timeout: float = 120.0) -> None:
        """Recover jobs from the store and start the scheduling thread."""
        self._thread = threading.Thread(target=self._run, name="distml-scheduler", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the scheduler did not finish recovering jobs in time")
        if self.error is not None:
            raise RuntimeError(f"the scheduler failed to start: {self.error}")

    def submit(self, job: ResolvedJob) -> JobRecord:
        if self._thread is not None and not self.running:
            raise JobConflict(
                f"the scheduler has stopped ({self.error or 'shut down'}); restart the service"
            )
        rec = self.store.add_job(
            name=job.name or "",
            slots=job.slots,
            min_slots=job.min_slots,
            max_slots=job.max_slots,
            priority=job.priority,
            workdir=job.workdir,
        )
        files = self.files(rec.id)
        files.job_dir.mkdir(parents=True, exist_ok=True)
        files.config.write_text(yaml.safe_dump(job.config, sort_keys=False), encoding="utf-8")
        rec = self.store.update_job(
            rec.id, name=job.name or f"job-{rec.id}", job_dir=str(files.job_dir)
        )
        elastic = (
            f", elastic {job.min_slots}..{job.max_slots}" if job.max_slots > job.min_slots else ""
        )
        self.store.add_event(
            "submit",
            f"job {rec.id} '{rec.name}' submitted: {job.slots} slot(s){elastic}, "
            f"priority {job.priority}",
            rec.id,
        )
        self._post("add", rec.id)
        return rec

    def cancel(self, job_id: int) -> JobRecord:
        result: JobRecord = self._call("cancel", job_id)
        return result

    def migrate(self, job_id: int, slots: list[int] | None = None) -> JobRecord:
        result: JobRecord = self._call("migrate", job_id, slots)
        return result

    def shutdown(self, timeout: float | None = None) -> None:
        """Checkpoint every run (they resume at the next start) and stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def files(self, job_id: int) -> JobFiles:
        return JobFiles(self.state_dir / "jobs" / str(job_id))

    def resolve(self, ref: str | int) -> JobRecord:
        """A job by id or by name (JobNotFound, or JobConflict if a name is ambiguous)."""
        text = str(ref)
        if text.isdigit():
            try:
                return self.store.get_job(int(text))
            except KeyError:
                raise JobNotFound(f"no job {text}; see `distml jobs`") from None
        found = self.store.find_jobs(text)
        if not found:
            raise JobNotFound(f"no job named {text!r}; see `distml jobs`")
        active = [r for r in found if r.status in ACTIVE]
        pick = active if active else found[-1:]
        if len(pick) > 1:
            ids = ", ".join(str(r.id) for r in pick)
            raise JobConflict(f"name {text!r} matches jobs {ids}; use the job id")
        return pick[0]

    def info(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        used: set[int] = set()
        for rec in self.store.list_jobs():
            counts[rec.status] = counts.get(rec.status, 0) + 1
            if rec.status == "running":
                used.update(rec.placement)
        return {
            "slots": self.num_slots,
            "free_slots": self.num_slots - len(used),
            "policy": self.policy_name,
            **self.executor.describe(),
            "jobs": counts,
            "scheduler_alive": self.running,
            "error": self.error,
        }

    def _post(self, kind: str, *args: Any) -> Future[Any]:
        request = _Request(kind, args)
        self._inbox.put(request)
        self._wake.set()
        return request.future

    def _call(self, kind: str, *args: Any) -> Any:
        if self._thread is None:  # driven by hand through run_once (tests, notebooks)
            future = self._post(kind, *args)
            self._drain_inbox()
            return future.result(timeout=0)
        if not self.running:
            raise JobConflict("the scheduler is not running; restart it with `distml cluster up`")
        future = self._post(kind, *args)
        return future.result(timeout=self.options.stop_timeout_s + 30)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self.recover()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.store.add_event("error", f"recovery failed: {self.error}")
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop:
                self.run_once()
                self._wake.wait(self.options.tick_s)
                self._wake.clear()
            self._drain_inbox()
            self._stop_all(self.clock.now())
        except Exception as exc:
            # Keep the runs: a restarted scheduler re-attaches to them.
            self.error = f"{type(exc).__name__}: {exc}"
            self.store.add_event("error", f"scheduler stopped: {self.error}")
            self.store.add_event("error", traceback.format_exc(limit=8))
        finally:
            self._fail_pending()

    def run_once(self) -> None:
        """One pass of the loop: requests, exits and measurements, then a round if due.

        The thread calls it every tick; tests without the thread call :meth:`recover`
        once and then this.
        """
        self._drain_inbox()
        now = self.clock.now()
        self._watch(now)
        if self._dirty or (self._wakeup is not None and now >= self._wakeup):
            self._round(now)

    def _fail_pending(self) -> None:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not request.future.done():
                request.future.set_exception(JobConflict("the scheduler is shutting down"))

    def _drain_inbox(self) -> None:
        handlers: dict[str, Callable[..., Any]] = {
            "add": self._add,
            "cancel": self._cancel,
            "migrate": self._migrate,
        }
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                request.future.set_result(handlers[request.kind](*request.args))
            except Exception as exc:
                request.future.set_exception(exc)

    def _event(self, kind: str, message: str, job_id: int | None = None, reason: str = "") -> None:
        self.store.add_event(kind, message, job_id, reason)

    # ------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Rebuild the cluster state from the store: re-attach live runs, resume the rest."""
        now = self.clock.now()
        desc = ", ".join(f"{k} {v}" for k, v in self.executor.describe().items())
        self._event(
            "service",
            f"scheduler started: {self.num_slots} slot(s), policy {self.policy_name}, {desc}",
        )
        for rec in self.store.list_jobs(ACTIVE):
            if not self._admit(rec):
                continue
            if rec.status != "running":
                continue
            files = self.files(rec.id)
            proc = None
            if rec.pid:
                proc = self.executor.attach(
                    rec.id, rec.pid, rec.pid_start or "", tuple(rec.placement), files
                )
            if proc is not None and self._reattach(rec, proc, now):
                continue
            dead = JobProcess(rec.id, rec.pid or 0, rec.pid_start or "", (), files)
            outcome, detail = classify_exit(dead, Exit(None))
            if outcome == "completed":
                self._finish(rec.id, "completed", detail, now)
                continue
            self.store.close_allocations(rec.id, "lost")
            self.store.update_job(rec.id, status="suspended", pid=None, placement=[])
            self._event(
                "recover",
                f"job {rec.id}: its run (pid {rec.pid}) is gone after the scheduler restart; "
                "it resumes from its last checkpoint",
                rec.id,
            )

    def _admit(self, rec: JobRecord) -> bool:
        try:
            self._signatures[rec.id] = training_signature(
                yaml.safe_load(self.files(rec.id).config.read_text(encoding="utf-8")) or {}
            )
            queue_time = rec.submit_time - rec.priority * PRIORITY_SPAN
            self.state.add_job(rec.id, queue_time, rec.slots, rec.min_slots, rec.max_slots)
        except (OSError, UserError, yaml.YAMLError) as exc:
            self.store.update_job(
                rec.id, status="failed", end_time=self.clock.now(), message=str(exc)
            )
            self._event("failed", f"job {rec.id} cannot be scheduled: {exc}", rec.id)
            return False
        return True

    def _reattach(self, rec: JobRecord, proc: JobProcess, now: float) -> bool:
        per_node = self.state.gpus_per_node
        placement: Placement = tuple((s // per_node, s % per_node) for s in rec.placement)
        reason = f"re-attached after a scheduler restart (pid {proc.pid}, same start time)"
        decision: Decision = Start(job=rec.id, placement=placement, reason=reason)
        if len(placement) == 1 and self.state.slot_load(placement[0]) == 1:
            host = self.state.occupants(placement[0])[0]
            decision = Pack(job=rec.id, host=host, slot=placement[0], reason=reason)
        try:
            self.state.apply(decision, now)
        except InvalidDecision as exc:
            self._event("recover", f"job {rec.id} cannot keep its slots ({exc}); resuming it")
            self._live[rec.id] = _Live(proc, RunMonitor(proc.files.metrics, from_end=True), now)
            self._stop_runs([rec.id])
            self.store.close_allocations(rec.id, "stopped")
            self.store.update_job(rec.id, status="suspended", pid=None, placement=[])
            return True
        monitor = RunMonitor(proc.files.metrics, from_end=True)
        monitor.first_step_at = now  # it was training before the restart
        self._live[rec.id] = _Live(proc, monitor, now)
        self._event("reattach", f"job {rec.id}: {reason}", rec.id, reason)
        return True

    # ---------------------------------------------------------- requests
    def _add(self, job_id: int) -> None:
        if self._admit(self.store.get_job(job_id)):
            self._dirty = True

    def _cancel(self, job_id: int) -> JobRecord:
        rec = self.store.get_job(job_id)
        if rec.status in TERMINAL:
            raise JobConflict(f"job {job_id} is already {rec.status}")
        now = self.clock.now()
        if job_id in self._live:
            outcome, detail = self._stop_runs([job_id])[job_id]
            if outcome == "completed":
                self._finish(job_id, "completed", detail, now)
                return self.store.get_job(job_id)
        self._finish(job_id, "cancelled", "cancelled through the API", now)
        return self.store.get_job(job_id)

    def _migrate(self, job_id: int, slots: list[int] | None) -> JobRecord:
        job = self.state.jobs.get(job_id)
        if job is None or job.status is not JobStatus.RUNNING or job_id not in self._live:
            status = self.store.get_job(job_id).status
            raise JobConflict(f"job {job_id} is {status}; only running jobs can migrate")
        per_node = self.state.gpus_per_node
        if slots:
            if any(not 0 <= s < self.num_slots for s in slots):
                raise JobConflict(f"slots {slots} must be in 0..{self.num_slots - 1}")
            target: Placement | None = tuple((s // per_node, s % per_node) for s in slots)
        else:
            target = Planner(self.state).place(job.size)
            if target is None:
                raise JobConflict(f"no {job.size} free slot(s) to migrate job {job_id} to")
        assert target is not None
        decision = Migrate(job=job_id, placement=target, reason="requested through the API")
        try:
            self.state.apply(decision, self.clock.now())
        except InvalidDecision as exc:
            raise JobConflict(str(exc)) from None
        self._event(decision.kind, decision.describe(), job_id, decision.reason)
        self._carry_out([decision], self.clock.now())
        return self.store.get_job(job_id)

    # ------------------------------------------------------------ watching
    def _context(self, job_id: int) -> object:
        job = self.state.jobs[job_id]
        own = self._live[job_id].monitor
        if own.first_step_at is None:
            return ("starting",)
        if len(job.placement) == 1 and self.state.slot_load(job.placement[0]) == 2:
            mate = next(j for j in self.state.occupants(job.placement[0]) if j != job_id)
            mate_live = self._live.get(mate)
            if mate_live is not None and mate_live.monitor.first_step_at is not None:
                return ("packed", mate)
            return ("mate starting", mate)
        return SOLO

    def _watch(self, now: float) -> None:
        for job_id, live in list(self._live.items()):
            live.monitor.set_context(self._context(job_id), now)
            if live.monitor.poll(now):
                self._persist_progress(job_id, live, now)
            ended = self.executor.poll(live.proc)
            if ended is not None:
                self._on_exit(job_id, live, ended, now)
        self._measure(now)

    def _persist_progress(self, job_id: int, live: _Live, now: float) -> None:
        step = live.monitor.last_step
        if step != live.persisted_step and now - live.persisted_at >= 1.0:
            self.store.update_job(job_id, step=step)
            live.persisted_step, live.persisted_at = step, now

    def _on_exit(self, job_id: int, live: _Live, ended: Exit, now: float) -> None:
        live.monitor.poll(now)
        del self._live[job_id]
        outcome, detail = classify_exit(live.proc, ended)
        self._dirty = True
        if outcome != "stopped":
            self._finish(job_id, outcome, detail, now)
            return
        reason = "its run stopped outside the scheduler (a signal); it resumes from its checkpoint"
        self.state.apply(Suspend(job=job_id, reason=reason), now)
        self.store.close_allocations(job_id, "stopped")
        self.store.update_job(job_id, status="suspended", pid=None, placement=[], message=detail)
        self._event("suspend", f"suspend job {job_id}: {reason}", job_id, reason)

    def _measure(self, now: float) -> None:
        opts = self.options
        for job_id, live in self._live.items():
            monitor = live.monitor
            if monitor.context != SOLO:
                continue
            rate = monitor.rate(opts.measure_steps, opts.measure_seconds)
            if rate is None:
                continue
            nproc = live.proc.nproc
            if self._solo.record(job_id, self._signatures.get(job_id, ""), nproc, rate):
                self._event(
                    "throughput",
                    f"job {job_id} alone on {nproc} slot(s): {rate:.0f} samples/s (solo rate)",
                    job_id,
                )
        for slot in self.state.shared_slots():
            a, b = self.state.occupants(slot)
            la, lb = self._live.get(a), self._live.get(b)
            if la is None or lb is None:
                continue
            ma, mb = la.monitor, lb.monitor
            if ma.context != ("packed", b) or mb.context != ("packed", a):
                continue
            if ma.reported and mb.reported:
                continue
            ra = ma.rate(opts.measure_steps, opts.measure_seconds)
            rb = mb.rate(opts.measure_steps, opts.measure_seconds)
            if ra is None or rb is None:
                continue
            ma.reported = mb.reported = True
            self._report_pair(slot[1], (a, ra), (b, rb), now)

    def _report_pair(
        self, slot: int, first: tuple[int, float], second: tuple[int, float], now: float
    ) -> None:
        parts, normalized = [], {}
        for job_id, rate in (first, second):
            solo = self._solo.get(job_id, self._signatures.get(job_id, ""), 1)
            if solo is None:
                parts.append(f"job {job_id} {rate:.0f} samples/s (no solo rate yet)")
                continue
            normalized[job_id] = rate / solo[0]
            parts.append(
                f"job {job_id} {rate:.0f} samples/s = {normalized[job_id]:.2f} x {solo[0]:.0f} "
                f"({solo[1]})"
            )
        text = "; ".join(parts)
        if len(normalized) < 2:
            message = f"packed on slot {slot}: {text}; packing cannot be judged yet"
        else:
            total = sum(normalized.values())
            message = f"packed on slot {slot}: {text}; normalized sum {total:.2f}"
            for job_id, value in normalized.items():
                self.state.set_throughput(job_id, value, now)
            self._dirty = True
        for job_id in (first[0], second[0]):
            self._event("throughput", message, job_id)

    # ---------------------------------------------------------- scheduling
    def _round(self, now: float) -> None:
        self._dirty = False
        decisions = self.policy.schedule(self.state, now)
        applied: list[Decision] = []
        deferred: list[int] = []
        retry_soon = False
        for decision in decisions:
            why = self._defer_reason(decision, now)
            if why is not None:
                deferred.append(decision.job)
                version = self.state.jobs[decision.job].version
                key = (decision.job, decision.kind, version, why.split()[1])
                if key not in self._noted:
                    self._noted.add(key)
                    self._event(
                        "defer",
                        f"{decision.describe()} -- deferred: job {decision.job} {why}",
                        decision.job,
                        decision.reason,
                    )
                continue
            try:
                self.state.apply(decision, now)
            except InvalidDecision as exc:
                # After a deferral, later decisions may depend on the deferred one.
                if not deferred:
                    self._event("reject", str(exc), decision.job, decision.reason)
                    retry_soon = True
                break
            self._event(decision.kind, decision.describe(), decision.job, decision.reason)
            applied.append(decision)
        if applied:
            self._carry_out(applied, now)
        after = self.clock.now()
        wakeup = self.policy.next_wakeup(self.state, after)
        if deferred or retry_soon:
            again = min((self._guard_end(j, after) for j in deferred), default=after + 1.0)
            wakeup = again if wakeup is None else min(wakeup, again)
        self._wakeup = wakeup

    def _defer_reason(self, decision: Decision, now: float) -> str | None:
        live = self._live.get(decision.job)
        if live is None or not isinstance(decision, _STOPPING):
            return None
        first = live.monitor.first_step_at
        if first is None:
            if now - live.launched < self.options.start_grace_s:
                return "is still starting (no training step yet)"
            return None
        trained = now - first
        if trained < self.options.min_run_s:
            return f"has trained {trained:.1f}s of its minimum run of {self.options.min_run_s:g}s"
        steps = live.monitor.steps_seen
        if steps < self.options.min_run_steps:
            return f"has trained {steps} steps of its minimum run of {self.options.min_run_steps}"
        return None

    def _guard_end(self, job_id: int, now: float) -> float:
        live = self._live.get(job_id)
        if live is None or live.monitor.first_step_at is None:
            return now + 0.5  # poll until the first step shows up
        if live.monitor.steps_seen < self.options.min_run_steps:
            return now + self.options.tick_s
        return max(now + 0.05, live.monitor.first_step_at + self.options.min_run_s)

    def _carry_out(self, applied: list[Decision], now: float) -> None:
        stopping = list(
            dict.fromkeys(
                d.job for d in applied if isinstance(d, _STOPPING) and d.job in self._live
            )
        )
        for job_id, (outcome, detail) in self._stop_runs(stopping).items():
            if outcome != "stopped":
                self._finish(job_id, outcome, detail, self.clock.now())
                continue
            self.store.close_allocations(job_id, "stopped")
            if self.state.jobs[job_id].status is JobStatus.SUSPENDED:
                self.store.update_job(
                    job_id, status="suspended", pid=None, placement=[], message=detail
                )
            self._event("stopped", f"job {job_id} stopped: {detail}", job_id)
        for job_id in dict.fromkeys(d.job for d in applied):
            job = self.state.jobs.get(job_id)
            if job is not None and job.status is JobStatus.RUNNING and job_id not in self._live:
                self._launch(job_id, self.clock.now())

    def _stop_runs(self, job_ids: list[int]) -> dict[int, tuple[str, str]]:
        """Signal every run to checkpoint, wait (kill after the timeout), classify exits."""
        for job_id in job_ids:
            self.executor.request_stop(self._live[job_id].proc)
        deadline = time.monotonic() + self.options.stop_timeout_s
        pending = list(job_ids)
        ended: dict[int, Exit] = {}
        while pending:
            for job_id in list(pending):
                result = self.executor.poll(self._live[job_id].proc)
                if result is not None:
                    ended[job_id] = result
                    pending.remove(job_id)
            if pending and time.monotonic() > deadline:
                for job_id in pending:
                    self._event(
                        "kill",
                        f"job {job_id} did not stop within {self.options.stop_timeout_s:g}s; "
                        "killed (it resumes from its previous checkpoint)",
                        job_id,
                    )
                    self.executor.kill(self._live[job_id].proc)
                deadline = time.monotonic() + 30
            if pending:
                time.sleep(0.05)
        outcomes = {}
        for job_id in job_ids:
            live = self._live.pop(job_id)
            live.monitor.poll(self.clock.now())
            outcomes[job_id] = classify_exit(live.proc, ended[job_id])
        return outcomes

    def _launch(self, job_id: int, now: float) -> None:
        job = self.state.jobs[job_id]
        rec = self.store.get_job(job_id)
        per_node = self.state.gpus_per_node
        slots = tuple(node * per_node + gpu for node, gpu in job.placement)
        files = self.files(job_id)
        resume_step, resume = prepare_run(files)
        run = rec.runs + 1
        try:
            request = LaunchRequest(job_id, files, rec.workdir, slots, run, resume)
            proc = self.executor.launch(request)
        except (OSError, UserError) as exc:
            self._finish(job_id, "failed", f"could not start: {exc}", now)
            return
        self._live[job_id] = _Live(proc, RunMonitor(files.metrics, from_end=True), now)
        self.store.update_job(
            job_id,
            status="running",
            placement=list(slots),
            nproc=len(slots),
            pid=proc.pid,
            pid_start=proc.start_id,
            runs=run,
            start_time=rec.start_time or now,
            message="",
        )
        self.store.open_allocation(job_id, list(slots), len(slots), proc.pid)
        origin = f"resuming from the checkpoint at step {resume_step}" if resume_step else "step 0"
        self._event(
            "launch",
            f"job {job_id} run {run}: pid {proc.pid} on slot(s) {list(slots)} with "
            f"--nproc {len(slots)}, {origin}",
            job_id,
        )

    def _finish(self, job_id: int, status: str, detail: str, now: float) -> None:
        job = self.state.jobs.get(job_id)
        if job is not None and job.status is not JobStatus.DONE:
            self.state.finish(job_id, now)
        last = last_step_record(self.files(job_id).metrics)
        values: dict[str, Any] = {}
        if last is not None:
            values = {"step": int(last["step"]), "final_loss": float(last["loss"])}
        self.store.update_job(
            job_id, status=status, end_time=now, pid=None, placement=[], message=detail, **values
        )
        self.store.close_allocations(job_id, status)
        loss = f", last loss {values['final_loss']:.6g}" if values else ""
        self._event(status, f"job {job_id} {status}: {detail}{loss}", job_id)
        self._dirty = True

    def _stop_all(self, now: float) -> None:
        job_ids = list(self._live)
        for job_id, (outcome, detail) in self._stop_runs(job_ids).items():
            if outcome != "stopped":
                self._finish(job_id, outcome, detail, now)
                continue
            self.store.close_allocations(job_id, "service stopped")
            self.store.update_job(
                job_id,
                status="suspended",
                pid=None,
                placement=[],
                message="checkpointed when the service stopped; resumes at the next start",
            )
        self._event("service", f"scheduler stopped; {len(job_ids)} run(s) checkpointed")
