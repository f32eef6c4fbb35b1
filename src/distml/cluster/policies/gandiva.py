"""Gandiva-style introspective scheduling: time-slicing, packing, migration, grow-shrink.

Each round, in order:

1. **Unpack** pairs whose measured throughputs sum to <= 1 (packing lost).
2. **Start** waiting jobs in round-robin order on free slots; for a job that fits
   one node but finds no node with room, first **defragment**: migrate small
   jobs off the emptiest node so the job is not split across nodes.
3. **Shrink** elastic jobs towards their minimum so a waiting job can start.
4. **Time-slice**: once a running job has held its GPUs for ``quantum``
   seconds and jobs are waiting, suspend it (to checkpoint) and resume the
   next waiting job; suspended jobs rejoin the tail of the round-robin queue.
5. **Pack** a waiting 1-GPU job onto the slot of a lone running 1-GPU job when
   the pair's throughputs (normalized to alone speed) sum to > 1, or, with
   ``trial_packing``, when no measurement exists yet (step 1 undoes a bad trial).
6. **Unpack** packed jobs onto slots that are still free.
7. **Consolidate** (migrate) jobs split across more nodes than needed.
8. **Grow** elastic jobs into free slots when nothing waits.

Indices (round-robin queue, slice queue, packing hosts, split and elastic jobs)
are kept from the state's change journal, so a round costs about the work it
decides, not the number of jobs.
"""

from __future__ import annotations

from collections.abc import Iterator

from distml.cluster.decisions import (
    Decision,
    Grow,
    Migrate,
    Pack,
    Placement,
    Shrink,
    Slot,
    Suspend,
    Unpack,
)
from distml.cluster.placement import Planner, nodes_spanned
from distml.cluster.policies.base import Policy, launch
from distml.cluster.state import ClusterState, Job, JobStatus, min_nodes
from distml.errors import ConfigError


class _Round:
    """What one scheduling round has planned so far."""

    def __init__(self, state: ClusterState, now: float) -> None:
        self.state = state
        self.now = now
        self.planner = Planner(state)
        self.decisions: list[Decision] = []
        self.busy: set[int] = set()  # jobs already decided on this round
        self.slots: set[Slot] = set()  # shared slots already changed this round
        self.launched = 0
        # Jobs started or resumed this round: id -> (index of the decision, placement).
        self.fresh: dict[int, tuple[int, Placement]] = {}
        self.dropped: set[int] = set()  # indices of decisions superseded later in the round

    def result(self) -> list[Decision]:
        if not self.dropped:
            return self.decisions
        return [d for i, d in enumerate(self.decisions) if i not in self.dropped]

    def add(self, decision: Decision, *jobs: int) -> None:
        self.decisions.append(decision)
        self.busy.update(jobs)
        self.busy.add(decision.job)


class GandivaPolicy(Policy):
    """Time-slicing, packing, migration and grow-shrink over round-robin order."""

    name = "gandiva"

    def __init__(
        self,
        quantum: float = 1800.0,
        packing: bool = True,
        trial_packing: bool = True,
        migration: bool = True,
        defragment: bool = True,
        elastic: bool = True,
        lookahead: int = 32,
        max_migrations: int = 16,
        pack_candidates: int = 8,
    ) -> None:
        super().__init__()
        if quantum <= 0:
            raise ConfigError(f"gandiva quantum must be > 0 seconds, got {quantum}")
        for label, value in (
            ("lookahead", lookahead),
            ("max_migrations", max_migrations),
            ("pack_candidates", pack_candidates),
        ):
            if value < 1:
                raise ConfigError(f"gandiva {label} must be >= 1, got {value}")
        self.quantum = float(quantum)
        self.packing = packing
        self.trial_packing = trial_packing
        self.migration = migration
        self.defragment = defragment
        self.elastic = elastic
        self.lookahead = lookahead
        self.max_migrations = max_migrations
        self.pack_candidates = pack_candidates
        # Ordered dicts used as ordered sets, kept exact by _sync:
        self._rr: dict[int, None] = {}  # waiting jobs, round-robin order
        self._slices: dict[int, float] = {}  # running job -> slice start, oldest first
        self._hosts: dict[int, None] = {}  # 1-GPU jobs running alone: packing hosts
        self._split: dict[int, None] = {}  # running jobs on more nodes than needed
        self._elastic: dict[int, None] = {}  # running elastic jobs
        self._recheck: dict[Slot, None] = {}  # shared slots whose throughputs changed

    def schedule(self, state: ClusterState, now: float) -> list[Decision]:
        self._sync(state)
        plan = _Round(state, now)
        if self.packing:
            self._unpack_losers(plan)
        self._start_waiting(plan)
        if self.elastic and self._elastic:
            self._shrink_for_waiting(plan)
        self._time_slice(plan)
        if self.packing:
            self._pack(plan)
            self._unpack_to_free(plan)
        if self.migration:
            self._consolidate(plan)
        if self.elastic and (self._elastic or plan.fresh):
            self._grow(plan)
        return plan.result()

    def next_wakeup(self, state: ClusterState, now: float) -> float | None:
        self._sync(state)
        if state.num_waiting == 0 or not self._slices:
            return None
        expiry = next(iter(self._slices.values())) + self.quantum
        return expiry if expiry > now else now + self.quantum

    # ------------------------------------------------------------- indices
    def _sync(self, state: ClusterState) -> None:
        for job, before in self.changed_jobs(state):
            job_id = job.job_id
            if job.status is not JobStatus.RUNNING:
                self._slices.pop(job_id, None)
                self._hosts.pop(job_id, None)
                self._split.pop(job_id, None)
                self._elastic.pop(job_id, None)
                self._rr.pop(job_id, None)
                if job.waiting:
                    self._rr[job_id] = None  # (re)joins the tail of the round-robin queue
                continue
            self._rr.pop(job_id, None)
            if before is not JobStatus.RUNNING or job_id not in self._slices:
                self._slices.pop(job_id, None)
                self._slices[job_id] = job.changed_at
            if job.max_gpus == 1:
                if state.slot_load(job.placement[0]) == 1:
                    self._hosts[job_id] = None
                else:
                    self._hosts.pop(job_id, None)
                    self._recheck[job.placement[0]] = None
            if nodes_spanned(job.placement) > min_nodes(job.size, state.gpus_per_node):
                self._split[job_id] = None
            else:
                self._split.pop(job_id, None)
            if job.elastic:
                self._elastic[job_id] = None

    def _waiting(self, plan: _Round, limit: int) -> Iterator[Job]:
        """Waiting jobs in round-robin order, not yet decided on this round."""
        seen = 0
        for job_id in self._rr:
            if seen >= limit:
                return
            if job_id in plan.busy:
                continue
            seen += 1
            yield plan.state.jobs[job_id]

    # -------------------------------------------------------------- starting
    def _start_waiting(self, plan: _Round) -> None:
        planner = plan.planner
        if planner.free_gpus == 0:
            return
        for job in self._waiting(plan, self.lookahead):
            if planner.free_gpus == 0:
                return
            size = job.num_gpus
            if size > planner.free_gpus:
                if not job.elastic or job.min_gpus > planner.free_gpus:
                    continue
                size = planner.free_gpus
            placement = None
            if self.defragment and planner.max_node_free() < size <= planner.gpus_per_node:
                placement = self._defragment(plan, size)
            if placement is None:
                placement = planner.place(size)
            if placement is None:
                continue
            self._launch(plan, job, placement, "round-robin turn on free GPUs")

    def _launch(self, plan: _Round, job: Job, placement: Placement, reason: str) -> None:
        plan.planner.take(placement)
        plan.fresh[job.job_id] = (len(plan.decisions), placement)
        plan.add(launch(job, placement, reason))
        plan.launched += 1

    def _defragment(self, plan: _Round, size: int) -> Placement | None:
        """Empty enough of one node, by migrating small jobs away, to hold ``size`` GPUs."""
        planner = plan.planner
        tried = 0
        for count in range(size - 1, 0, -1):
            for node in planner.nodes_with_free(count):
                if tried == 4:
                    return None
                tried += 1
                moves = self._evacuate(plan, node, size - count)
                if moves is None:
                    continue
                for job, target in moves:
                    plan.add(
                        Migrate(
                            job=job.job_id,
                            placement=target,
                            reason=f"defragment node {node} for a waiting {size}-GPU job",
                        )
                    )
                free = sorted(planner.node_free(node))[:size]
                return tuple((node, gpu) for gpu in free)
        return None

    def _evacuate(self, plan: _Round, node: int, need: int) -> list[tuple[Job, Placement]] | None:
        """Migrations that free ``need`` slots on ``node``, or None with the plan unchanged."""
        state, planner = plan.state, plan.planner
        movable = []
        for job_id in state.jobs_on_node(node):
            job = state.jobs[job_id]
            if (
                job_id in plan.busy
                or job.status is not JobStatus.RUNNING
                or any(n != node for n, _ in job.placement)
                or any(state.slot_load(slot) > 1 for slot in job.placement)
            ):
                continue
            movable.append(job)
        movable.sort(key=lambda j: (j.size, j.job_id))
        picked: list[Job] = []
        freed = 0
        for job in movable:
            if freed >= need:
                break
            picked.append(job)
            freed += job.size
        if freed < need:
            return None
        moves: list[tuple[Job, Placement]] = []
        for job in picked:
            target = planner.place(job.size, exclude=(node,))
            if target is None or nodes_spanned(target) > 1:
                for _, taken in moves:
                    planner.release(taken)
                return None
            planner.take(target)
            moves.append((job, target))
        for job, _ in moves:
            planner.release(job.placement)
        return moves

    # ---------------------------------------------------------------- elastic
    def _shrink_for_waiting(self, plan: _Round) -> None:
        planner, state = plan.planner, plan.state
        for job in self._waiting(plan, self.lookahead):
            need = job.min_gpus - planner.free_gpus
            if need <= 0:
                continue
            donors = []
            for job_id in list(self._elastic):
                donor = state.jobs.get(job_id)
                if donor is None or donor.status is not JobStatus.RUNNING:
                    self._elastic.pop(job_id, None)
                elif job_id not in plan.busy and donor.size > donor.min_gpus:
                    donors.append(donor)
            if sum(d.size - d.min_gpus for d in donors) < need:
                return
            donors.sort(key=lambda d: (d.min_gpus - d.size, d.job_id))
            for donor in donors:
                if need <= 0:
                    break
                give = min(donor.size - donor.min_gpus, need)
                keep = _drop_slots(donor.placement, give)
                planner.release(set(donor.placement) - set(keep))
                plan.add(
                    Shrink(
                        job=donor.job_id,
                        placement=keep,
                        reason=f"give {give} GPU(s) to waiting job {job.job_id}",
                    )
                )
                need -= give
            size = min(job.num_gpus, planner.free_gpus)
            placement = planner.place(size)
            if placement is not None:
                self._launch(plan, job, placement, "started on GPUs shrunk from elastic jobs")

    def _grow(self, plan: _Round) -> None:
        planner, state = plan.planner, plan.state
        if planner.free_gpus == 0 or state.num_waiting > plan.launched:
            return
        candidates: list[tuple[Job, Placement]] = []
        for job_id, (_, placement) in plan.fresh.items():
            if state.jobs[job_id].elastic:
                candidates.append((state.jobs[job_id], placement))
        for job_id in list(self._elastic):
            job = state.jobs.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                self._elastic.pop(job_id, None)
            elif job_id not in plan.busy:
                candidates.append((job, job.placement))
        for job, placement in candidates:
            if planner.free_gpus == 0:
                return
            extra = min(job.max_gpus - len(placement), planner.free_gpus)
            if extra <= 0:
                continue
            added = planner.place_on(sorted({n for n, _ in placement}), extra)
            planner.take(added)
            if len(added) < extra:
                more = planner.place(extra - len(added))
                if more is not None:
                    planner.take(more)
                    added.extend(more)
            grown = placement + tuple(added)
            reason = f"{len(added)} idle GPU(s) and nothing waiting"
            if job.job_id in plan.fresh:
                # Started this round: start it at the larger size instead of resizing at
                # once, and start it last, since the added slots may be freed by decisions
                # planned after the original start.
                plan.dropped.add(plan.fresh[job.job_id][0])
                plan.fresh[job.job_id] = (len(plan.decisions), grown)
                plan.add(launch(job, grown, f"elastic start: {reason}"))
            else:
                plan.add(Grow(job=job.job_id, placement=grown, reason=reason))

    # ----------------------------------------------------------- time-slicing
    def _time_slice(self, plan: _Round) -> None:
        state, planner = plan.state, plan.planner
        if state.num_waiting <= plan.launched or not self._slices:
            return
        if next(iter(self._slices.values())) + self.quantum > plan.now:
            return  # no slice is over yet
        expired = self._expired(plan)
        exhausted = False
        pool: list[tuple[list[Job], int]] = []  # candidate victims: (jobs, slots freed)
        pooled = 0
        for job in self._waiting(plan, self.lookahead):
            need = job.min_gpus - planner.free_gpus
            while pooled < need and not exhausted:
                unit = next(expired, None)
                if unit is None:
                    exhausted = True
                    break
                pool.append(unit)
                pooled += unit[1]
            if pooled < need:
                if exhausted and not pool and planner.free_gpus == 0:
                    return
                continue
            while planner.free_gpus < job.min_gpus:
                jobs, slots_freed = pool.pop(0)
                pooled -= slots_freed
                released: set[Slot] = set()
                for victim in jobs:
                    released.update(victim.placement)
                    plan.add(
                        Suspend(
                            job=victim.job_id,
                            reason=f"time slice of {self.quantum:.0f}s used; job {job.job_id} "
                            "takes its round-robin turn",
                        )
                    )
                planner.release(released)
            size = min(job.num_gpus, planner.free_gpus)
            placement = planner.place(size)
            if placement is not None:
                self._launch(plan, job, placement, "round-robin turn (time-slicing)")

    def _expired(self, plan: _Round) -> Iterator[tuple[list[Job], int]]:
        """Running jobs whose slice is over, oldest first, as units that free whole slots."""
        state = plan.state
        offered: set[int] = set()
        for job_id, start in self._slices.items():
            if start + self.quantum > plan.now:
                return
            if job_id in offered:
                continue
            job = state.jobs[job_id]
            mates = state.occupants(job.placement[0]) if len(job.placement) == 1 else (job_id,)
            if any(m in plan.busy for m in mates) or job.placement[0] in plan.slots:
                continue
            offered.update(mates)
            yield [state.jobs[m] for m in mates], len(job.placement)

    # ---------------------------------------------------------------- packing
    def _pack(self, plan: _Round) -> None:
        state = plan.state
        if state.num_waiting <= plan.launched or not (self._hosts or plan.fresh):
            return
        for job in self._waiting(plan, self.lookahead):
            if job.max_gpus != 1:
                continue
            found = self._find_host(plan, job)
            if found is None:
                continue
            host, slot, reason = found
            plan.slots.add(slot)
            plan.add(Pack(job=job.job_id, host=host.job_id, slot=slot, reason=reason), host.job_id)
            plan.launched += 1

    def _find_host(self, plan: _Round, job: Job) -> tuple[Job, Slot, str] | None:
        state = plan.state
        stale: list[int] = []
        tried = 0
        found: tuple[Job, Slot, str] | None = None
        # Jobs started on a free GPU this round can host too, then the running ones.
        fresh = [
            (host_id, placement[0])
            for host_id, (_, placement) in plan.fresh.items()
            if len(placement) == 1 and state.jobs[host_id].max_gpus == 1
        ]
        for host_id, slot in fresh:
            if slot in plan.slots or tried == self.pack_candidates:
                continue
            tried += 1
            reason = self._pack_reason(state, state.jobs[host_id], job)
            if reason is not None:
                return state.jobs[host_id], slot, reason
        for host_id in self._hosts:
            host = state.jobs.get(host_id)
            if (
                host is None
                or host.status is not JobStatus.RUNNING
                or host.max_gpus != 1
                or state.slot_load(host.placement[0]) != 1
            ):
                stale.append(host_id)
                continue
            if host_id in plan.busy or host.placement[0] in plan.slots:
                continue
            if tried == self.pack_candidates:
                break
            tried += 1
            reason = self._pack_reason(state, host, job)
            if reason is not None:
                found = (host, host.placement[0], reason)
                break
        for host_id in stale:
            del self._hosts[host_id]
        return found

    def _pack_reason(self, state: ClusterState, host: Job, job: Job) -> str | None:
        """Why ``job`` may join ``host``, or None if the pair should not be packed."""
        estimate = state.estimate_packed(host, job)
        if estimate is None:
            return "trial packing: pair throughput not measured yet" if self.trial_packing else None
        total = estimate[0] + estimate[1]
        if total <= 1.0:
            return None
        return f"packed throughput {estimate[0]:.2f} + {estimate[1]:.2f} = {total:.2f} > 1"

    def _unpack_losers(self, plan: _Round) -> None:
        state = plan.state
        slots, self._recheck = list(self._recheck), {}
        for slot in slots:
            if state.slot_load(slot) != 2:
                continue
            host_id, joiner_id = state.occupants(slot)
            host, joiner = state.jobs[host_id], state.jobs[joiner_id]
            if host.throughput is None or joiner.throughput is None:
                continue
            total = host.throughput + joiner.throughput
            if total <= 1.0:
                plan.slots.add(slot)
                plan.add(
                    Unpack(
                        job=joiner_id,
                        reason=f"packed throughput {host.throughput:.2f} + "
                        f"{joiner.throughput:.2f} = {total:.2f} <= 1: time-share instead",
                    ),
                    host_id,
                )

    def _unpack_to_free(self, plan: _Round) -> None:
        planner, state = plan.planner, plan.state
        if planner.free_gpus == 0:
            return
        for slot in state.shared_slots():
            if planner.free_gpus == 0:
                return
            host_id, joiner_id = state.occupants(slot)
            if slot in plan.slots or host_id in plan.busy or joiner_id in plan.busy:
                continue
            target = planner.place(1)
            if target is None:
                return
            planner.take(target)
            plan.slots.add(slot)
            plan.add(
                Unpack(
                    job=joiner_id, placement=target, reason="a GPU is free: run alone at full speed"
                ),
                host_id,
            )

    # -------------------------------------------------------------- migration
    def _consolidate(self, plan: _Round) -> None:
        planner, state = plan.planner, plan.state
        moved = 0
        for job_id in list(self._split):
            if planner.free_gpus == 0 or moved == self.max_migrations:
                return
            job = state.jobs.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                del self._split[job_id]
                continue
            spanned = nodes_spanned(job.placement)
            if spanned <= min_nodes(job.size, state.gpus_per_node):
                del self._split[job_id]
                continue
            if job_id in plan.busy:
                continue
            planner.release(job.placement)
            target = planner.place(job.size)
            if target is None or nodes_spanned(target) >= spanned:
                planner.take(job.placement)
                continue
            planner.take(target)
            moved += 1
            plan.add(
                Migrate(
                    job=job_id,
                    placement=target,
                    reason=f"consolidate from {spanned} to {nodes_spanned(target)} node(s)",
                )
            )


def _drop_slots(placement: Placement, count: int) -> Placement:
    """``placement`` minus ``count`` slots, taken from the nodes where it has fewest."""
    per_node: dict[int, int] = {}
    for node, _ in placement:
        per_node[node] = per_node.get(node, 0) + 1
    order = sorted(placement, key=lambda s: (per_node[s[0]], s[0], -s[1]))
    dropped = set(order[:count])
    return tuple(s for s in placement if s not in dropped)
