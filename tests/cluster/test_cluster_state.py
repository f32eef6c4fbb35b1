"""ClusterState transitions, over-allocation guards, attained service, journal and placement."""

from __future__ import annotations

import pytest

from distml.cluster import (
    ClusterState,
    Grow,
    InvalidDecision,
    JobStatus,
    Migrate,
    Pack,
    Resume,
    Shrink,
    SimulatedClock,
    Start,
    Suspend,
    Unpack,
)
from distml.cluster.placement import Planner, nodes_spanned
from distml.cluster.policies.base import Policy
from distml.errors import ConfigError, UserError


def _state(nodes: int = 2, gpn: int = 4) -> ClusterState:
    return ClusterState(nodes, gpn, SimulatedClock())


def test_start_suspend_resume_accrues_two_dimensional_service() -> None:
    state = _state()
    state.add_job(1, 0.0, 2)
    state.apply(Start(job=1, placement=((0, 0), (0, 1)), reason="r"), now=10.0)
    job = state.jobs[1]
    assert job.status is JobStatus.RUNNING and job.start_time == 10.0
    assert job.attained_service(110.0) == pytest.approx(200.0)  # 2 GPUs x 100 s
    assert state.free_gpus == 6 and state.busy_gpus == 2
    state.apply(Suspend(job=1, reason="r"), now=110.0)
    assert job.status is JobStatus.SUSPENDED and job.placement == ()
    assert job.attained_service(500.0) == pytest.approx(200.0)  # no service while suspended
    assert job.num_preemptions == 1 and state.free_gpus == 8
    state.apply(Resume(job=1, placement=((1, 2), (1, 3)), reason="r"), now=500.0)
    assert job.attained_service(550.0) == pytest.approx(300.0)
    state.finish(1, 600.0)
    assert job.status is JobStatus.DONE and job.finish_time == 600.0 and state.free_gpus == 8


def test_over_allocation_and_wrong_transitions_are_rejected() -> None:
    state = _state()
    state.add_job(1, 0.0, 2)
    state.add_job(2, 0.0, 1)
    state.apply(Start(job=1, placement=((0, 0), (0, 1)), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match=r"slot \(0, 1\) is held by \[1\]"):
        state.apply(Start(job=2, placement=((0, 1),), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="outside"):
        state.apply(Start(job=2, placement=((1, 0), (1, 1)), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="expected suspended"):
        state.apply(Resume(job=2, placement=((1, 0),), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="does not exist"):
        state.apply(Start(job=2, placement=((5, 0),), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="must keep the size"):
        state.apply(Migrate(job=1, placement=((1, 0),), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="host does not run alone on the slot"):
        state.apply(Pack(job=2, host=1, slot=(0, 0), reason="r"), now=0.0)
    state.add_job(3, 0.0, 2)
    state.apply(Start(job=2, placement=((1, 0),), reason="r"), now=0.0)
    with pytest.raises(InvalidDecision, match="only 1-GPU jobs can be packed"):
        state.apply(Pack(job=3, host=2, slot=(1, 0), reason="r"), now=0.0)
    # the rejected decisions changed nothing
    assert state.jobs[3].status is JobStatus.QUEUED and state.free_gpus == 5
    assert state.occupants((1, 0)) == (2,) and state.occupants((0, 1)) == (1,)


def test_add_job_rejects_bad_sizes() -> None:
    state = _state(1, 2)
    with pytest.raises(UserError, match="needs 3 GPUs but the cluster has 2"):
        state.add_job(1, 0.0, 3)
    with pytest.raises(UserError, match="need 1 <= min <= num_gpus <= max"):
        state.add_job(2, 0.0, 2, min_gpus=3)
    state.add_job(3, 0.0, 1)
    with pytest.raises(UserError, match="already in the cluster"):
        state.add_job(3, 0.0, 1)
    with pytest.raises(ConfigError, match="needs >= 1 node"):
        ClusterState(0, 8)


def test_pack_unpack_and_pair_measurements() -> None:
    state = _state(1, 2)
    for job_id in (1, 2):
        state.add_job(job_id, 0.0, 1)
    state.apply(Start(job=1, placement=((0, 0),), reason="r"), now=0.0)
    state.apply(Pack(job=2, host=1, slot=(0, 0), reason="r"), now=0.0)
    assert state.occupants((0, 0)) == (1, 2) and state.shared_slots() == [(0, 0)]
    assert state.free_gpus == 1  # a shared slot is one busy GPU
    state.add_job(3, 0.0, 1)
    with pytest.raises(InvalidDecision, match=r"host does not run alone|already shared"):
        state.apply(Pack(job=3, host=1, slot=(0, 0), reason="r"), now=0.0)
    state.set_throughput(1, 0.45, now=1.0)
    state.set_throughput(2, 0.40, now=1.0)
    assert state.estimate_packed(state.jobs[2], state.jobs[1]) == (0.40, 0.45)
    state.apply(Unpack(job=2, placement=((0, 1),), reason="r"), now=2.0)
    assert state.shared_slots() == [] and state.jobs[2].placement == ((0, 1),)
    with pytest.raises(InvalidDecision, match="not on a shared slot"):
        state.apply(Unpack(job=2, reason="r"), now=2.0)


def test_grow_and_shrink_validate_elastic_bounds() -> None:
    state = _state(1, 4)
    state.add_job(1, 0.0, 2, min_gpus=1, max_gpus=3)
    state.apply(Start(job=1, placement=((0, 0), (0, 1)), reason="r"), now=0.0)
    state.apply(Grow(job=1, placement=((0, 0), (0, 1), (0, 2)), reason="r"), now=1.0)
    assert state.jobs[1].size == 3 and state.free_gpus == 1
    with pytest.raises(InvalidDecision, match="size outside"):
        state.apply(Grow(job=1, placement=((0, 0), (0, 1), (0, 2), (0, 3)), reason="r"), now=1.0)
    with pytest.raises(InvalidDecision, match="strict subset"):
        state.apply(Shrink(job=1, placement=((0, 3),), reason="r"), now=1.0)
    state.apply(Shrink(job=1, placement=((0, 0),), reason="r"), now=2.0)
    assert state.jobs[1].size == 1 and state.free_gpus == 3
    # 1 GPU for 1 s, 2 GPUs for 1 s, then 1 GPU for 2 s
    assert state.jobs[1].attained_service(4.0) == pytest.approx(2.0 + 3.0 + 2.0)


class _Recorder(Policy):
    name = "recorder"

    def schedule(self, state: ClusterState, now: float) -> list:  # type: ignore[type-arg]
        self.last = [(job.job_id, before) for job, before in self.changed_jobs(state)]
        return []


def test_changed_jobs_reports_each_change_once_with_previous_status() -> None:
    state = _state()
    policy = _Recorder()
    state.add_job(1, 0.0, 1)
    state.add_job(2, 0.0, 1)
    policy.schedule(state, 0.0)
    assert policy.last == [(1, None), (2, None)]
    state.apply(Start(job=1, placement=((0, 0),), reason="r"), now=1.0)
    state.apply(Suspend(job=1, reason="r"), now=1.0)
    state.apply(Start(job=2, placement=((0, 0),), reason="r"), now=1.0)
    policy.schedule(state, 1.0)
    assert policy.last == [(1, JobStatus.QUEUED), (2, JobStatus.QUEUED)]
    policy.schedule(state, 2.0)
    assert policy.last == []
    state.finish(2, 3.0)
    policy.schedule(state, 3.0)
    assert policy.last == [(2, JobStatus.RUNNING)]


def test_planner_best_fit_and_fewest_nodes() -> None:
    state = _state(3, 4)
    state.add_job(1, 0.0, 3)
    state.apply(Start(job=1, placement=((1, 0), (1, 1), (1, 2)), reason="r"), now=0.0)
    state.add_job(2, 0.0, 2)
    state.apply(Start(job=2, placement=((2, 0), (2, 1)), reason="r"), now=0.0)
    planner = Planner(state)
    # free: n0=4, n1=1, n2=2 -> a 1-GPU job takes the tightest node, a 2-GPU job n2
    assert planner.place(1) == ((1, 3),)
    assert planner.place(2) == ((2, 2), (2, 3))
    # 6 GPUs cannot fit one node: emptiest node first, then the best fit for the rest
    six = planner.place(6)
    assert six is not None and nodes_spanned(six) == 2 and {n for n, _ in six} == {0, 2}
    assert planner.place(8) is None
    planner.take(((0, 0), (0, 1), (0, 2), (0, 3)))
    assert planner.free_gpus == 3 and planner.max_node_free() == 2
    assert state.free_gpus == 7  # the real state is untouched
    planner.release(((0, 0),))
    # n0 and n1 now both have exactly one free slot: either is a best fit
    assert planner.place(1) in (((0, 0),), ((1, 3),))
    assert planner.place(2) == ((2, 2), (2, 3))
    with pytest.raises(ValueError, match="not free"):
        planner.take(((1, 0),))
