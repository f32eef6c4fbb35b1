"""Policies on hand-made traces whose right answers can be worked out by hand."""

from __future__ import annotations

from collections import defaultdict

import pytest

from distml.cluster import (
    ClusterState,
    Decision,
    JobStatus,
    Migrate,
    Pack,
    SimulatedClock,
    Start,
    TraceJob,
    Unpack,
    build_policy,
    run_simulation,
)
from distml.cluster.decisions import Grow, Shrink
from distml.cluster.placement import nodes_spanned
from distml.cluster.policies import available_policies, policy_options
from distml.errors import ConfigError

NO_COSTS = {"suspend_resume_cost": 0.0, "migration_cost": 0.0, "resize_cost": 0.0}


def _job(job_id: int, submit: float, duration: float, gpus: int = 1, **kw: int) -> TraceJob:
    return TraceJob(job_id, submit, duration, gpus, **kw)  # type: ignore[arg-type]


class _Log:
    """Observer that keeps every decision with its time."""

    def __init__(self) -> None:
        self.decisions: list[tuple[float, Decision]] = []
        self.snapshots: list[tuple[float, dict[int, float], list[tuple[int, int]]]] = []

    def __call__(self, now: float, state: ClusterState, decisions: list[Decision]) -> None:
        self.decisions.extend((now, d) for d in decisions)
        service = {j.job_id: j.attained_service(now) for j in state.jobs.values()}
        self.snapshots.append((now, service, state.shared_slots()))

    def starts(self) -> list[int]:
        return [d.job for _, d in self.decisions if isinstance(d, Start)]

    def of(self, kind: type) -> list[tuple[float, Decision]]:
        return [(t, d) for t, d in self.decisions if isinstance(d, kind)]


def test_registry_names_and_errors() -> None:
    assert available_policies() == ["fifo", "gandiva", "las"]
    assert "thresholds" in policy_options("las")
    with pytest.raises(ConfigError, match=r"unknown scheduling policy 'srtf'; choose one of fifo"):
        build_policy("srtf")
    with pytest.raises(ConfigError, match=r"policy 'fifo' has no option 'quantum'"):
        build_policy("fifo", quantum=10)
    with pytest.raises(ConfigError, match="strictly increasing"):
        build_policy("las", thresholds=[100, 50])
    with pytest.raises(ConfigError, match="quantum must be > 0"):
        build_policy("gandiva", quantum=0)


def test_fifo_starts_in_submission_order_with_head_of_line_blocking() -> None:
    jobs = [_job(0, 0, 100, 2), _job(1, 1, 100, 2), _job(2, 2, 10, 1), _job(3, 3, 10, 1)]
    log = _Log()
    result = run_simulation(jobs, "fifo", 2, 2, observer=log)
    assert log.starts() == [0, 1, 2, 3]
    # job 1 blocks the 1-GPU jobs although nothing else could use the cluster better
    assert result.jcts == [100, 199, 208, 207]
    assert result.preemptions == 0


def test_las_runs_short_jobs_first_where_that_is_provably_better() -> None:
    # One GPU; a long job starts first, two short ones arrive just after it.
    jobs = [_job(0, 0, 10_000), _job(1, 10, 100), _job(2, 20, 100)]
    fifo = run_simulation(jobs, "fifo", 1, 1, **NO_COSTS)
    assert fifo.jcts == [10_000, 10_090, 10_180]
    las = run_simulation(
        jobs, "las", 1, 1, policy_options={"thresholds": [500]}, suspend_resume_cost=30.0
    )
    # At t=500 the long job drops to queue 1; the short ones (queue 0) run in FIFO
    # order to t=600 and t=700; the long job resumes (30 s restore) with 9,500 s left.
    assert las.jcts == pytest.approx([700 + 30 + 9_500, 590, 680])
    assert las.preemptions == 1
    assert las.avg_jct < fifo.avg_jct / 2.5


def test_las_never_preempts_within_a_queue() -> None:
    # Two long jobs in one queue on one GPU: the second waits, nobody is preempted.
    jobs = [_job(0, 0, 1_000), _job(1, 5, 1_000)]
    las = run_simulation(jobs, "las", 1, 1, policy_options={"thresholds": [10_000]}, **NO_COSTS)
    assert las.preemptions == 0 and las.jcts == [1_000, 1_995]


def test_las_starvation_guard_promotes_a_waiting_job() -> None:
    # 1 GPU: job 0 is demoted at t=100 and preempted by job 1, which is long too.
    jobs = [_job(0, 0, 1_000), _job(1, 1, 5_000)]
    plain = run_simulation(jobs, "las", 1, 1, policy_options={"thresholds": [100]}, **NO_COSTS)
    # without the guard job 1 keeps the GPU (same queue) until it finishes
    assert plain.jcts == pytest.approx([5_100 + 900, 5_099])
    guarded = run_simulation(
        jobs,
        "las",
        1,
        1,
        policy_options={"thresholds": [100], "starvation_limit": 500},
        **NO_COSTS,
    )
    # promoted back to queue 0 at t=600, job 0 preempts job 1 and is done far sooner
    assert guarded.jcts[0] < plain.jcts[0] / 2
    assert guarded.preemptions > plain.preemptions


def test_gandiva_time_slices_three_jobs_on_two_gpus() -> None:
    jobs = [_job(i, 0, 3_000) for i in range(3)]
    log = _Log()
    result = run_simulation(
        jobs,
        "gandiva",
        2,
        2,
        policy_options={"quantum": 100, "packing": False},
        observer=log,
        **NO_COSTS,
    )
    # every job gets the GPU within two quanta and keeps making progress
    at = {now: service for now, service, _ in log.snapshots}
    assert all(at[200.0][j] > 0 for j in range(3))
    for now, service in at.items():
        if 300 <= now <= 4_000:
            assert max(service.values()) - min(service.values()) <= 200 + 1e-6, now
    # round-robin shares 2 GPUs: all finish close to 3 x 3000 / 2, none at FIFO's 6000
    assert max(result.jcts) == pytest.approx(4_500, abs=200)
    assert min(result.jcts) > 4_000
    assert result.preemptions > 20


def test_gandiva_packs_only_when_combined_throughput_beats_one() -> None:
    jobs = [_job(0, 0, 600), _job(1, 0, 600)]
    log = _Log()
    good = run_simulation(jobs, "gandiva", 1, 1, packing_speed=0.6, observer=log, **NO_COSTS)
    assert good.packs == 1 and log.of(Pack)[0][1].reason.endswith("= 1.20 > 1")
    assert good.jcts == pytest.approx([1_000, 1_000])  # both at 0.6 speed from t=0
    log = _Log()
    bad = run_simulation(
        jobs,
        "gandiva",
        1,
        1,
        packing_speed=0.45,
        policy_options={"quantum": 10_000},
        observer=log,
        **NO_COSTS,
    )
    assert bad.packs == 0 and all(not shared for _, _, shared in log.snapshots)
    assert bad.jcts == [600, 1_200]


def test_gandiva_pair_estimates_choose_the_host_and_bad_trials_are_unpacked() -> None:
    state = ClusterState(1, 2, SimulatedClock())
    for job_id in range(4):
        state.add_job(job_id, 0.0, 1)
    state.apply(Start(job=0, placement=((0, 0),), reason="r"), now=0.0)
    state.apply(Start(job=1, placement=((0, 1),), reason="r"), now=0.0)
    pairs = {(0, 2): (0.4, 0.5), (1, 2): (0.8, 0.7)}
    state.packing_estimator = lambda a, b: pairs.get((a.job_id, b.job_id))
    policy = build_policy("gandiva", quantum=1e9, trial_packing=False)
    decisions = policy.schedule(state, 1.0)
    # job 2 joins job 1 (1.5 > 1), never job 0 (0.9); job 3 has no estimate and no trial
    assert [(type(d), d.job, getattr(d, "host", None)) for d in decisions] == [(Pack, 2, 1)]
    for d in decisions:
        state.apply(d, 1.0)
    # the live measurement disagrees with the estimate: the pair is split up again
    state.set_throughput(1, 0.5, now=2.0)
    state.set_throughput(2, 0.3, now=2.0)
    decisions = policy.schedule(state, 2.0)
    assert [(type(d), d.job) for d in decisions] == [(Unpack, 2)]
    assert "0.50 + 0.30 = 0.80 <= 1" in decisions[0].reason
    state.apply(decisions[0], 2.0)
    assert state.jobs[2].status is JobStatus.SUSPENDED
    # the measured pair is remembered and not packed again
    assert policy.schedule(state, 3.0) == []


def _split_scenario(**options: object) -> tuple[list[TraceJob], dict[str, object]]:
    # 2 nodes x 2 GPUs. Long X and short Z fill node 0, long Y and short W node 1;
    # when Z and W end, the 2-GPU job C arrives and finds one free GPU per node.
    jobs = [
        _job(0, 0, 300),  # X -> n0
        _job(1, 0, 100),  # Z -> n0
        _job(2, 0, 10_000),  # Y -> n1
        _job(3, 0, 100),  # W -> n1
        _job(4, 150, 1_000, 2),  # C
    ]
    return jobs, {"packing": False, **options}


def test_gandiva_migration_consolidates_a_split_job_when_slots_free_up() -> None:
    jobs, options = _split_scenario(defragment=False)
    log = _Log()
    result = run_simulation(
        jobs,
        "gandiva",
        4,
        2,
        policy_options=options,
        split_speed=0.5,
        migration_cost=20.0,
        observer=log,
    )
    (start_c,) = [d for _, d in log.of(Start) if d.job == 4]
    assert nodes_spanned(start_c.placement) == 2
    ((when, move),) = log.of(Migrate)
    assert when == 300 and move.job == 4 and nodes_spanned(move.placement) == 1
    assert move.reason == "consolidate from 2 to 1 node(s)"
    # 150 s at half speed (75 s of work), 20 s migration stall, then 925 s at full speed
    assert result.jcts[4] == pytest.approx(300 + 20 + 925 - 150)
    stuck = run_simulation(
        jobs, "gandiva", 4, 2, policy_options={**options, "migration": False}, split_speed=0.5
    )
    assert stuck.migrations == 0 and stuck.jcts[4] == pytest.approx(150 + 2 * 925)


def test_gandiva_defragments_a_node_for_a_waiting_job() -> None:
    jobs, options = _split_scenario()
    log = _Log()
    run_simulation(jobs, "gandiva", 4, 2, policy_options=options, observer=log)
    moves = log.of(Migrate)
    assert [(t, d.job) for t, d in moves] == [(150, 0)]  # X leaves node 0 for node 1
    assert moves[0][1].placement[0][0] == 1
    (start_c,) = [d for _, d in log.of(Start) if d.job == 4]
    assert {n for n, _ in start_c.placement} == {0}


def test_gandiva_grows_and_shrinks_elastic_jobs() -> None:
    jobs = [_job(0, 0, 4_000, 2, min_gpus=1, max_gpus=4), _job(1, 100, 500, 2)]
    log = _Log()
    result = run_simulation(jobs, "gandiva", 4, 4, observer=log, **NO_COSTS)
    # alone, the elastic job starts on all 4 GPUs rather than the 2 it asked for
    ((t0, start),) = [(t, d) for t, d in log.of(Start) if d.job == 0]
    assert t0 == 0 and len(start.placement) == 4 and start.reason.startswith("elastic start")
    ((t1, shrink),) = log.of(Shrink)
    assert (t1, shrink.job, shrink.new_size) == (100, 0, 2) and "waiting job 1" in shrink.reason
    ((t2, grow),) = log.of(Grow)
    assert (t2, grow.job, grow.new_size) == (600, 0, 4)
    assert result.jcts[1] == pytest.approx(500)
    # job 0: 100 s at 2x speed, 500 s at 1x, then back on 4 GPUs (2x) for the rest
    assert result.jcts[0] == pytest.approx(600 + (4_000 - 200 - 500) / 2)


@pytest.mark.parametrize("name", ["fifo", "las", "gandiva"])
def test_a_second_round_without_changes_decides_nothing(name: str) -> None:
    state = ClusterState(2, 4, SimulatedClock())
    for job_id, gpus in enumerate([4, 2, 2, 1, 4, 1]):
        state.add_job(job_id, float(job_id), gpus)
    policy = build_policy(name)
    decisions = policy.schedule(state, 10.0)
    assert decisions
    for decision in decisions:
        state.apply(decision, 10.0)
    assert policy.schedule(state, 10.0) == []
    holders: dict[tuple[int, int], int] = defaultdict(int)
    for job in state.running_jobs():
        for slot in job.placement:
            holders[slot] += 1
    assert all(count <= 2 for count in holders.values())
