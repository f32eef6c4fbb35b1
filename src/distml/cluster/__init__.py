"""Cluster scheduling: the shared cluster state, policies, traces and the simulator.

The live scheduler service (a separate module) drives the same
:class:`ClusterState` and policy classes with real time; this package holds
everything that does not need a network: :func:`run_simulation` and
:func:`compare_policies` replay Philly-format or synthetic traces through
``fifo``, ``las`` (Tiresias) or ``gandiva`` under a configurable cost model.
"""

from __future__ import annotations

from distml.cluster.costs import CostModel
from distml.cluster.decisions import (
    Decision,
    Grow,
    InvalidDecision,
    Migrate,
    Pack,
    Preempt,
    Resume,
    Shrink,
    Start,
    Suspend,
    Unpack,
)
from distml.cluster.policies import available_policies, build_policy
from distml.cluster.policies.base import Policy
from distml.cluster.simulator import (
    SimResult,
    SimulationError,
    Simulator,
    compare_policies,
    format_table,
    run_simulation,
)
from distml.cluster.state import ClusterState, Job, JobStatus, SimulatedClock, WallClock
from distml.cluster.trace import Trace, TraceJob, load_philly_trace, synthetic_trace

__all__ = [
    "ClusterState",
    "CostModel",
    "Decision",
    "Grow",
    "InvalidDecision",
    "Job",
    "JobStatus",
    "Migrate",
    "Pack",
    "Policy",
    "Preempt",
    "Resume",
    "Shrink",
    "SimResult",
    "SimulatedClock",
    "SimulationError",
    "Simulator",
    "Start",
    "Suspend",
    "Trace",
    "TraceJob",
    "Unpack",
    "WallClock",
    "available_policies",
    "build_policy",
    "compare_policies",
    "format_table",
    "load_philly_trace",
    "run_simulation",
    "synthetic_trace",
]
