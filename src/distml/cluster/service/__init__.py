"""The live cluster scheduler service: an HTTP API over real ``distml train`` jobs.

``distml cluster up`` starts :func:`~distml.cluster.service.server.serve` in
the background: a FastAPI app on 127.0.0.1 with a bearer token, a SQLite
store of jobs, allocations and events, a scheduler thread that drives a
policy (fifo, las, gandiva) over a wall-clock
:class:`~distml.cluster.state.ClusterState`, and an executor (local
subprocesses, or Ray) that runs each job as ``distml train --resume``.
Suspend, migrate, pack and resize are all checkpoint-and-resume of distml's
elastic training. :mod:`distml.cluster.service.cli_api` holds the functions
the CLI calls.
"""

from __future__ import annotations

from distml.cluster.service.cli_api import (
    cancel_job,
    cluster_down,
    cluster_status,
    cluster_up,
    job_events,
    job_info,
    job_logs,
    list_jobs,
    migrate_job,
    submit,
)
from distml.cluster.service.jobspec import JobSpec, ResolvedJob, parse_spec_text, resolve_spec
from distml.cluster.service.scheduler_loop import Scheduler, SchedulerOptions

__all__ = [
    "JobSpec",
    "ResolvedJob",
    "Scheduler",
    "SchedulerOptions",
    "cancel_job",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "job_events",
    "job_info",
    "job_logs",
    "list_jobs",
    "migrate_job",
    "parse_spec_text",
    "resolve_spec",
    "submit",
]
