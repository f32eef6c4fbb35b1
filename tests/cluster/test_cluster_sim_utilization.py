"""The simulator's per-job GPU utilization model and its contended/useful utilization metrics.

Hand-made traces with known answers: what the GPUs do while a job waits,
how much of it is useful work, and that packing jobs which leave their GPUs
half idle raises useful work per GPU while packing saturating jobs does not.
"""

from __future__ import annotations

import statistics

import pytest

from distml.cluster import TraceJob, run_simulation, synthetic_trace
from distml.cluster.costs import CostModel
from distml.errors import ConfigError


def test_job_gpu_util_is_seeded_by_job_id_with_the_configured_mean() -> None:
    costs = CostModel(gpu_util=0.4)
    draws = [costs.job_gpu_util(i) for i in range(4000)]
    assert draws == [costs.job_gpu_util(i) for i in range(4000)]  # deterministic per job
    assert statistics.fmean(draws) == pytest.approx(0.4, abs=0.02)
    assert all(0.02 <= d <= 1.0 for d in draws) and len(set(draws)) > 3000
    assert CostModel().job_gpu_util(7) == 1.0  # default: every job saturates its GPUs


def test_packed_speeds_follow_the_combined_utilization() -> None:
    costs = CostModel(gpu_util=0.5, packing_overhead=0.9)
    assert costs.packed_speeds(0.3, 0.4) == pytest.approx((0.9, 0.9))  # fits in one GPU
    assert costs.packed_speeds(0.8, 0.8) == pytest.approx((0.9 / 1.6, 0.9 / 1.6))
    assert CostModel(packing_speed=0.6).packed_speeds(0.3, 0.3) == (0.6, 0.6)
    with pytest.raises(ConfigError, match=r"gpu_util must be in \(0, 1\]"):
        CostModel(gpu_util=0.0)
    with pytest.raises(ConfigError, match="gpu_util_concentration must be > 0"):
        CostModel(gpu_util=0.5, gpu_util_concentration=0.0)


def test_contended_metrics_on_a_hand_made_fifo_trace() -> None:
    # A (2 GPUs) runs 0..100 while B (1 GPU) waits; B runs 100..200 with nothing waiting.
    jobs = [TraceJob(0, 0, 100, 2), TraceJob(1, 0, 100, 1)]
    result = run_simulation(jobs, "fifo", 2, 2, gpu_util=0.5)
    u = CostModel(gpu_util=0.5).job_gpu_util
    assert result.contended_time == pytest.approx(100)
    assert result.contended_utilization == pytest.approx(1.0)
    assert result.contended_useful_utilization == pytest.approx(u(0))
    assert result.utilization == pytest.approx(300 / 400)
    assert result.useful_utilization == pytest.approx((u(0) * 200 + u(1) * 100) / 400)
    saturated = run_simulation(jobs, "fifo", 2, 2)
    assert saturated.contended_useful_utilization == pytest.approx(1.0)
    assert saturated.useful_utilization == pytest.approx(saturated.utilization)


@pytest.mark.parametrize("policy", ["fifo", "las", "gandiva"])
def test_integrated_useful_work_equals_the_traces_work(policy: str) -> None:
    # Stalls, packing, splits and resizes change when work is done, never how much.
    jobs = synthetic_trace(300, seed=3, elastic_fraction=0.3)
    costs = CostModel(gpu_util=0.5)
    result = run_simulation(jobs, policy, 32, 8, gpu_util=0.5)
    work = sum(costs.job_gpu_util(j.job_id) * j.num_gpus * j.duration for j in jobs)
    assert result.useful_utilization * 32 * result.makespan == pytest.approx(work, rel=1e-6)
    assert 0 < result.contended_useful_utilization <= result.contended_utilization <= 1
    if policy == "gandiva":
        assert result.packs > 0 and result.preemptions > 0


def _three_one_gpu_jobs_on_two_gpus(**costs: float) -> tuple[float, float, int]:
    # Three 1-GPU jobs at once on 2 GPUs: the third waits (fifo) or is packed (gandiva),
    # then moves to the GPU the first finisher frees (free of charge here).
    jobs = [TraceJob(i, 0, 1_000, 1) for i in range(3)]
    options = {"quantum": 1e9}  # packing only: no time-slicing
    fifo = run_simulation(jobs, "fifo", 2, 2, migration_cost=0.0, **costs)
    gandiva = run_simulation(
        jobs, "gandiva", 2, 2, policy_options=options, migration_cost=0.0, **costs
    )
    assert fifo.packs == 0
    return fifo.makespan, gandiva.makespan, gandiva.packs


def test_packing_half_idle_jobs_finishes_the_same_work_sooner() -> None:
    u = CostModel(gpu_util=0.3).job_gpu_util
    assert max(u(0) + u(1), u(0) + u(2), u(1) + u(2)) < 1  # any pair fits on one GPU
    fifo, gandiva, packs = _three_one_gpu_jobs_on_two_gpus(gpu_util=0.3)
    assert fifo == pytest.approx(2_000) and packs == 1
    # Packed at 0.9 of alone speed until t=1000 (900 s of work done), then alone.
    assert gandiva == pytest.approx(1_100)


def test_saturating_jobs_are_not_packed() -> None:
    # Jobs near full GPU use: a pair runs at 0.9 / (u_a + u_b) < 0.5 each, a loss.
    costs = {"gpu_util": 0.97, "gpu_util_concentration": 400.0}
    fifo, gandiva, packs = _three_one_gpu_jobs_on_two_gpus(**costs)
    assert packs == 0 and gandiva == fifo == pytest.approx(2_000)
