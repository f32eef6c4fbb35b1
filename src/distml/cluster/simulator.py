"""Trace-driven discrete-event simulator that replays jobs through a scheduling policy.

Time jumps from event to event (arrivals, completions, policy wake-ups such as
quantum ends or priority-threshold crossings, and an optional fixed scheduling
interval); the policy is asked for decisions only then, and each decision is
applied to the same :class:`ClusterState` the live scheduler uses. Job progress
follows :class:`CostModel`: stalls after resume/migration/resize, slowdown when
split across nodes, interference when packed. Completion times live in a heap
with lazy invalidation, so a run costs O(events x log) plus the policy's work.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distml.cluster.costs import CostModel
from distml.cluster.decisions import Decision, Grow, Migrate, Pack, Resume, Shrink, Suspend, Unpack
from distml.cluster.placement import nodes_spanned
from distml.cluster.policies import build_policy
from distml.cluster.policies.base import Policy
from distml.cluster.state import ClusterState, Job, JobStatus, SimulatedClock, min_nodes
from distml.cluster.trace import Trace, TraceJob, load_philly_trace
from distml.errors import ConfigError, DistmlError

Observer = Callable[[float, ClusterState, list[Decision]], None]

_COMPLETION, _WAKEUP = 0, 1
# Every this many rounds, check that some job progressed (catches preemption livelock).
_PROGRESS_CHECK_ROUNDS = 2_000
# Progress shortfall (seconds) still counted as complete, to absorb float rounding.
_DONE_TOLERANCE = 1e-6


class SimulationError(DistmlError):
    """The policy left jobs waiting with nothing left that could ever start them."""


@dataclass
class SimResult:
    """Metrics of one simulated run (seconds); ``jcts`` keeps every job's completion time.

    ``avg_queueing_delay`` is submit to first start; ``avg_waiting_time`` is all
    time not holding GPUs (JCT minus held time). ``utilization`` is busy GPU-time
    (a packed slot counts once) over GPUs x makespan. ``preemptions`` counts
    suspensions (including unpacking to the queue), ``migrations`` moves
    (including unpacking to a free GPU), ``resizes`` grows and shrinks.

    Over the whole makespan every policy that ends at the same time has the same
    utilization (the trace's work is fixed), so the ``contended_*`` metrics look
    only at the time when some job waits for GPUs -- when a scheduler can make a
    difference: ``contended_utilization`` is the busy fraction of GPUs then, and
    ``contended_useful_utilization`` the fraction doing useful work (per-job GPU
    utilization x speed, see :class:`CostModel`). ``useful_utilization`` is the
    latter over the whole makespan.
    """

    policy: str
    num_jobs: int
    gpus: int
    gpus_per_node: int
    avg_jct: float
    p50_jct: float
    p99_jct: float
    makespan: float
    utilization: float
    useful_utilization: float
    contended_time: float
    contended_utilization: float
    contended_useful_utilization: float
    avg_queueing_delay: float
    avg_waiting_time: float
    preemptions: int
    migrations: int
    packs: int
    unpacks: int
    resizes: int
    rounds: int
    skipped_jobs: int = 0
    wall_seconds: float = 0.0
    jcts: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float | int | str]:
        """Scalar metrics only, for tables and JSON."""
        return {k: v for k, v in self.__dict__.items() if k != "jcts"}


class _Progress:
    """Simulator-only bookkeeping of one job's work."""

    __slots__ = ("done", "duration", "held", "num_gpus", "rate", "since", "stall_until", "version")

    def __init__(self, duration: float, num_gpus: int) -> None:
        self.duration = duration
        self.num_gpus = num_gpus
        self.done = 0.0  # seconds of alone-speed work completed
        self.held = 0.0  # seconds holding GPUs
        self.rate = 0.0
        self.since = 0.0
        self.stall_until = 0.0
        self.version = 0

    def done_at(self, now: float) -> float:
        active_from = max(self.since, self.stall_until)
        return self.done + self.rate * max(0.0, now - active_from)

    def settle(self, now: float) -> None:
        if self.rate > 0.0:
            active_from = max(self.since, self.stall_until)
            if now > active_from:
                self.done += self.rate * (now - active_from)
            self.held += now - self.since
        self.since = now


class Simulator:
    """Replays ``jobs`` through ``policy`` on ``gpus`` GPUs, ``gpus_per_node`` per node."""

    def __init__(
        self,
        jobs: Sequence[TraceJob],
        policy: Policy,
        gpus: int,
        gpus_per_node: int = 8,
        costs: CostModel | None = None,
        observer: Observer | None = None,
    ) -> None:
        if gpus_per_node < 1 or gpus < gpus_per_node or gpus % gpus_per_node:
            raise ConfigError(
                f"gpus ({gpus}) must be a positive multiple of gpus_per_node ({gpus_per_node})"
            )
        self.jobs = sorted(jobs, key=lambda j: (j.submit_time, j.job_id))
        self.policy = policy
        self.costs = costs if costs is not None else CostModel()
        quantum = getattr(policy, "quantum", None)
        if quantum is not None and quantum <= self.costs.suspend_resume_cost:
            raise ConfigError(
                f"{policy.name} quantum ({quantum:g} s) must be longer than suspend_resume_cost "
                f"({self.costs.suspend_resume_cost:g} s), or time-sliced jobs never progress"
            )
        self.observer = observer
        self.clock = SimulatedClock(self.jobs[0].submit_time if self.jobs else 0.0)
        self.state = ClusterState(gpus // gpus_per_node, gpus_per_node, self.clock)
        self._util: dict[int, float] = {}
        # Sum of u x GPUs x speed over jobs computing now (stalled ones join at stall end).
        self._useful_rate = 0.0
        self._useful_of: dict[int, float] = {}
        self._stall_ends: list[tuple[float, int, int, float]] = []
        self.state.packing_estimator = lambda a, b: self.costs.packed_speeds(
            self._util[a.job_id], self._util[b.job_id]
        )
        self._progress: dict[int, _Progress] = {}
        self._events: list[tuple[float, int, int, int]] = []
        self._last_mark: tuple[int, float] = (-1, -1.0)
        self._counts = dict.fromkeys(
            ("preemptions", "migrations", "packs", "unpacks", "resizes", "rounds"), 0
        )

    def run(self) -> SimResult:
        started = time.perf_counter()
        state, events = self.state, self._events
        busy_area, last = 0.0, self.clock.now()
        # contended seconds, busy GPU-seconds then, useful GPU-seconds then, useful in all
        contended = [0.0, 0.0, 0.0, 0.0]
        next_wake = math.inf
        index, total = 0, len(self.jobs)
        while True:
            while events and self._stale(events[0]):
                heapq.heappop(events)
            arrival = self.jobs[index].submit_time if index < total else math.inf
            now = min(arrival, events[0][0] if events else math.inf)
            if now == math.inf:
                break
            busy_area += state.busy_gpus * (now - last)
            useful = self._useful_between(last, now)
            contended[3] += useful
            if state.num_waiting and now > last:
                contended[0] += now - last
                contended[1] += state.busy_gpus * (now - last)
                contended[2] += useful
            last = now
            self.clock.advance_to(now)
            while index < total and self.jobs[index].submit_time <= now:
                self._arrive(self.jobs[index])
                index += 1
            while events and events[0][0] <= now:
                _, kind, job_id, version = heapq.heappop(events)
                if kind == _WAKEUP:
                    next_wake = math.inf
                elif self._progress[job_id].version == version:
                    self._complete(job_id, now)
            self._round(now)
            if self._counts["rounds"] % _PROGRESS_CHECK_ROUNDS == 0:
                self._check_progress(now)
            wake = self.policy.next_wakeup(state, now)
            interval = self.costs.schedule_interval
            if interval is not None and (state.num_running or state.num_waiting):
                wake = min(wake if wake is not None else math.inf, now + interval)
            if wake is not None and now < wake < next_wake:
                next_wake = wake
                heapq.heappush(events, (wake, _WAKEUP, -1, 0))
        left = [j for j in state.jobs.values() if j.status is not JobStatus.DONE]
        if left:
            raise SimulationError(
                f"policy '{self.policy.name}' left {len(left)} job(s) waiting with nothing "
                f"running (first: job {left[0].job_id} needing {left[0].num_gpus} GPUs)"
            )
        return self._result(busy_area, contended, time.perf_counter() - started)

    # ------------------------------------------------------------- internals
    def _check_progress(self, now: float) -> None:
        finished = sum(1 for j in self.state.jobs.values() if j.status is JobStatus.DONE)
        work = sum(p.done_at(now) for p in self._progress.values())
        mark = (finished, work)
        if mark == self._last_mark:
            raise SimulationError(
                f"no job progressed in {_PROGRESS_CHECK_ROUNDS} scheduling rounds before "
                f"t={now:.0f} s: jobs are preempted before their suspend_resume_cost "
                f"({self.costs.suspend_resume_cost:g} s) is paid; lower the cost or let jobs "
                "run longer between preemptions"
            )
        self._last_mark = mark

    def _useful_between(self, start: float, end: float) -> float:
        """Useful GPU-seconds computed in [start, end]; stalls ending inside start then."""
        total, t, heap = 0.0, start, self._stall_ends
        while heap and heap[0][0] <= end:
            at, job_id, version, rate = heapq.heappop(heap)
            if self._progress[job_id].version != version:
                continue  # the job changed again before its stall ended
            at = max(at, t)
            total += self._useful_rate * (at - t)
            t = at
            self._set_useful_rate(job_id, rate)
        return total + self._useful_rate * (end - t)

    def _set_useful_rate(self, job_id: int, rate: float) -> None:
        self._useful_rate += rate - self._useful_of.pop(job_id, 0.0)
        if rate > 0.0:
            self._useful_of[job_id] = rate
        elif not self._useful_of:
            self._useful_rate = 0.0  # drop float drift whenever the cluster is idle

    def _stale(self, event: tuple[float, int, int, int]) -> bool:
        _, kind, job_id, version = event
        return kind == _COMPLETION and self._progress[job_id].version != version

    def _arrive(self, spec: TraceJob) -> None:
        self.state.add_job(
            spec.job_id, spec.submit_time, spec.num_gpus, spec.min_gpus, spec.max_gpus
        )
        self._progress[spec.job_id] = _Progress(spec.duration, spec.num_gpus)
        self._util[spec.job_id] = self.costs.job_gpu_util(spec.job_id)

    def _round(self, now: float) -> None:
        decisions = self.policy.schedule(self.state, now)
        self._counts["rounds"] += 1
        for decision in decisions:
            self._apply(decision, now)
        if self.observer is not None:
            self.observer(now, self.state, decisions)

    def _apply(self, decision: Decision, now: float) -> None:
        state, costs = self.state, self.costs
        job = state.jobs[decision.job]
        affected = {job.job_id, *self._mates(job)}
        if isinstance(decision, Pack):
            affected.add(decision.host)
        resuming = job.status is JobStatus.SUSPENDED
        for job_id in affected:
            self._progress[job_id].settle(now)
        state.apply(decision, now)
        stall = 0.0
        if isinstance(decision, Resume | Pack) and resuming:
            stall = costs.suspend_resume_cost
        elif isinstance(decision, Migrate) or (
            isinstance(decision, Unpack) and decision.placement is not None
        ):
            stall = costs.migration_cost
            self._counts["migrations"] += 1
        elif isinstance(decision, Grow | Shrink):
            stall = costs.resize_cost
            self._counts["resizes"] += 1
        if isinstance(decision, Suspend) or (
            isinstance(decision, Unpack) and decision.placement is None
        ):
            self._counts["preemptions"] += 1
        if isinstance(decision, Pack):
            self._counts["packs"] += 1
        elif isinstance(decision, Unpack):
            self._counts["unpacks"] += 1
        if stall > 0.0:
            self._progress[job.job_id].stall_until = now + stall
        affected.update(self._mates(job))
        for job_id in affected:
            self._refresh(job_id, now)

    def _mates(self, job: Job) -> list[int]:
        if len(job.placement) != 1:
            return []
        return [m for m in self.state.occupants(job.placement[0]) if m != job.job_id]

    def _refresh(self, job_id: int, now: float) -> None:
        """Recompute a job's speed after a change and reschedule its completion."""
        progress = self._progress[job_id]
        progress.settle(now)
        progress.version += 1
        job = self.state.jobs[job_id]
        if job.status is not JobStatus.RUNNING:
            progress.rate = 0.0
            self._set_useful_rate(job_id, 0.0)
            return
        efficiency = 1.0
        if nodes_spanned(job.placement) > min_nodes(job.size, self.state.gpus_per_node):
            efficiency *= self.costs.split_speed
        if len(job.placement) == 1:
            mates = [m for m in self.state.occupants(job.placement[0]) if m != job_id]
            if mates:
                util = self._util
                efficiency *= self.costs.packed_speeds(util[job_id], util[mates[0]])[0]
        self.state.set_throughput(job_id, efficiency, now)
        progress.rate = efficiency * job.size / progress.num_gpus
        useful = self._util[job_id] * progress.num_gpus * progress.rate
        if progress.stall_until > now:
            self._set_useful_rate(job_id, 0.0)
            entry = (progress.stall_until, job_id, progress.version, useful)
            heapq.heappush(self._stall_ends, entry)
        else:
            self._set_useful_rate(job_id, useful)
        begin = max(now, progress.stall_until)
        finish = begin + max(0.0, progress.duration - progress.done) / progress.rate
        heapq.heappush(self._events, (finish, _COMPLETION, job_id, progress.version))

    def _complete(self, job_id: int, now: float) -> None:
        progress = self._progress[job_id]
        progress.settle(now)
        if progress.duration - progress.done > _DONE_TOLERANCE * max(1.0, progress.duration):
            self._refresh(job_id, now)  # float drift: finish a moment later
            return
        job = self.state.jobs[job_id]
        mates = self._mates(job)
        for mate in mates:
            self._progress[mate].settle(now)
        progress.rate = 0.0
        progress.version += 1
        self._set_useful_rate(job_id, 0.0)
        self.state.finish(job_id, now)
        for mate in mates:
            self._refresh(mate, now)

    def _result(self, busy_area: float, contended: list[float], wall: float) -> SimResult:
        jobs = [self.state.jobs[spec.job_id] for spec in self.jobs]
        jcts = [(j.finish_time or 0.0) - j.submit_time for j in jobs]
        queueing = [(j.start_time or 0.0) - j.submit_time for j in jobs]
        waiting = [jct - self._progress[j.job_id].held for jct, j in zip(jcts, jobs, strict=True)]
        first = min((j.submit_time for j in jobs), default=0.0)
        makespan = max((j.finish_time or 0.0 for j in jobs), default=first) - first
        capacity = self.state.total_gpus * makespan
        seconds, busy, useful_contended, useful = contended
        contended_capacity = self.state.total_gpus * seconds
        return SimResult(
            policy=self.policy.name,
            num_jobs=len(jobs),
            gpus=self.state.total_gpus,
            gpus_per_node=self.state.gpus_per_node,
            avg_jct=_mean(jcts),
            p50_jct=_percentile(jcts, 50),
            p99_jct=_percentile(jcts, 99),
            makespan=makespan,
            utilization=busy_area / capacity if capacity > 0 else 0.0,
            useful_utilization=useful / capacity if capacity > 0 else 0.0,
            contended_time=seconds,
            contended_utilization=busy / contended_capacity if seconds > 0 else 0.0,
            contended_useful_utilization=(
                useful_contended / contended_capacity if seconds > 0 else 0.0
            ),
            avg_queueing_delay=_mean(queueing),
            avg_waiting_time=_mean(waiting),
            wall_seconds=wall,
            jcts=jcts,
            **self._counts,
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


TraceInput = str | Path | Trace | Sequence[TraceJob]


def resolve_trace(
    trace: TraceInput,
    gpus: int,
    *,
    offset: int = 0,
    limit: int | None = None,
    cluster: str | None = None,
) -> Trace:
    """A path is loaded (window, cluster filter); jobs bigger than ``gpus`` are skipped."""
    if isinstance(trace, str | Path):
        return load_philly_trace(
            trace, offset=offset, limit=limit, cluster=cluster, max_gpus=gpus, oversize="skip"
        )
    jobs = list(trace.jobs if isinstance(trace, Trace) else trace)
    fitting = [j for j in jobs if (j.min_gpus or j.num_gpus) <= gpus]
    skipped = len(jobs) - len(fitting) + (trace.skipped if isinstance(trace, Trace) else 0)
    return Trace(jobs=fitting, skipped=skipped)


def run_simulation(
    trace: TraceInput,
    policy: str,
    gpus: int,
    gpus_per_node: int = 8,
    *,
    policy_options: Mapping[str, Any] | None = None,
    offset: int = 0,
    limit: int | None = None,
    cluster: str | None = None,
    observer: Observer | None = None,
    **cost_options: Any,
) -> SimResult:
    """Simulate one policy on a trace (path, :class:`Trace` or jobs); see :class:`CostModel`."""
    costs = CostModel.from_options(**cost_options)
    scheduler = build_policy(policy, **dict(policy_options or {}))
    loaded = resolve_trace(trace, gpus, offset=offset, limit=limit, cluster=cluster)
    if not loaded.jobs:
        raise ConfigError(f"no job of the trace fits on {gpus} GPUs; use more GPUs")
    result = Simulator(loaded.jobs, scheduler, gpus, gpus_per_node, costs, observer).run()
    result.skipped_jobs = loaded.skipped
    return result


def compare_policies(
    trace: TraceInput,
    policies: Sequence[str] = ("fifo", "las", "gandiva"),
    gpus: int = 64,
    gpus_per_node: int = 8,
    *,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    offset: int = 0,
    limit: int | None = None,
    cluster: str | None = None,
    plot_path: str | Path | None = None,
    **cost_options: Any,
) -> dict[str, dict[str, float | int | str]]:
    """Run each policy on the same jobs; ``{policy: summary}``, optionally plotting JCT CDFs."""
    loaded = resolve_trace(trace, gpus, offset=offset, limit=limit, cluster=cluster)
    options = policy_options or {}
    unknown = sorted(set(options) - set(policies))
    if unknown:
        raise ConfigError(f"policy_options names {unknown} which are not among {list(policies)}")
    results = [
        run_simulation(
            loaded, name, gpus, gpus_per_node, policy_options=options.get(name), **cost_options
        )
        for name in policies
    ]
    if plot_path is not None:
        from distml.cluster.plot import plot_jct_cdf

        plot_jct_cdf(results, plot_path)
    return {result.policy: result.summary() for result in results}


def format_table(summaries: Mapping[str, Mapping[str, float | int | str]]) -> str:
    """A plain-text table of :func:`compare_policies` output (hours for times)."""
    columns = [
        ("avg_jct", "avg JCT h", 3600.0),
        ("p99_jct", "p99 JCT h", 3600.0),
        ("makespan", "makespan h", 3600.0),
        ("utilization", "util", 1.0),
        ("contended_utilization", "util queued", 1.0),
        ("contended_useful_utilization", "useful queued", 1.0),
        ("avg_queueing_delay", "avg queue h", 3600.0),
        ("preemptions", "preempt", 1.0),
        ("migrations", "migrate", 1.0),
        ("packs", "packs", 1.0),
    ]
    header = ["policy"] + [label for _, label, _ in columns]
    rows = [header]
    for name, summary in summaries.items():
        row = [name]
        for key, _, scale in columns:
            value = float(summary[key]) / scale
            fraction = "utilization" in key
            row.append(f"{value:.3f}" if scale != 1.0 or fraction else f"{value:.0f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
