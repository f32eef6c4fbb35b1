"""Job traces for the simulator: the Philly CSV format and seeded synthetic traces.

The Philly format is ``timestamp,duration,num_gpus,gpu_time,cluster`` with
``timestamp`` as ``YYYY-MM-DD HH:MM:SS`` (submit time) and ``duration`` in
seconds; extra columns are ignored and only the first three are required.
Rows are ordered by submit time, a window of ``limit`` jobs is taken from
``offset``, and submit times are rebased so the window starts at 0. Jobs that
need more GPUs than the cluster has are skipped and counted (or rejected).
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from distml.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("timestamp", "duration", "num_gpus")
_HEADER_HINT = "expected header timestamp,duration,num_gpus[,gpu_time,cluster]"


@dataclass(frozen=True)
class TraceJob:
    """One job: when it arrives, how long it runs alone, and how many GPUs it wants.

    ``duration`` is seconds on ``num_gpus`` GPUs packed in as few nodes as
    possible. ``min_gpus``/``max_gpus`` default to ``num_gpus``; a wider range
    makes the job elastic (its speed scales linearly with GPUs held).
    """

    job_id: int
    submit_time: float
    duration: float
    num_gpus: int
    min_gpus: int | None = None
    max_gpus: int | None = None
    cluster: str = ""

    @property
    def gpu_time(self) -> float:
        return self.duration * self.num_gpus


@dataclass
class Trace:
    """Jobs sorted by submit time, plus what loading dropped."""

    jobs: list[TraceJob]
    skipped: int = 0
    source: str = ""
    skipped_gpus: list[int] = field(default_factory=list)


def load_philly_trace(
    path: str | Path,
    *,
    offset: int = 0,
    limit: int | None = None,
    cluster: str | None = None,
    max_gpus: int | None = None,
    oversize: str = "skip",
) -> Trace:
    """Read a Philly-format CSV and return the requested window of jobs.

    ``cluster`` keeps one virtual cluster's jobs (column ``cluster``). Jobs with
    ``num_gpus > max_gpus`` are skipped and counted when ``oversize="skip"``,
    or raise UserError when ``oversize="error"``.
    """
    if oversize not in ("skip", "error"):
        raise UserError(f"oversize must be 'skip' or 'error', got '{oversize}'")
    if offset < 0 or (limit is not None and limit < 1):
        raise UserError(f"trace window needs offset >= 0 and limit >= 1, got {offset}, {limit}")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"trace file '{file}' not found; pass a Philly-format CSV ({_HEADER_HINT})")
    rows = _read_rows(file, cluster)
    if not rows:
        where = f" for cluster '{cluster}'" if cluster is not None else ""
        raise UserError(f"trace file '{file}' has no jobs{where}; {_HEADER_HINT}")
    rows.sort(key=lambda r: (r[0], r[1]))
    if offset >= len(rows):
        raise UserError(
            f"trace offset {offset} is past the end of '{file}' ({len(rows)} jobs); "
            "use a smaller offset"
        )
    window = rows[offset : offset + limit if limit is not None else None]
    start = window[0][0]
    trace = Trace(jobs=[], source=str(file))
    for index, (submitted, _, duration, gpus, name) in enumerate(window, start=offset):
        if max_gpus is not None and gpus > max_gpus:
            trace.skipped += 1
            trace.skipped_gpus.append(gpus)
            continue
        submit = (submitted - start).total_seconds()
        trace.jobs.append(TraceJob(index, submit, duration, gpus, cluster=name))
    if trace.skipped:
        message = (
            f"trace '{file}' has {trace.skipped} job(s) needing more than {max_gpus} GPUs "
            f"(largest {max(trace.skipped_gpus)})"
        )
        if oversize == "error":
            raise UserError(f"{message}; use more GPUs or oversize='skip'")
        log.warning("%s; skipped them", message)
    return trace


def _read_rows(file: Path, cluster: str | None) -> list[tuple[datetime, int, float, int, str]]:
    with file.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise UserError(f"trace file '{file}' is empty; {_HEADER_HINT}")
        names = [name.strip().lower() for name in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if cluster is not None and "cluster" not in names:
            missing.append("cluster")
        if missing:
            raise UserError(
                f"trace file '{file}' lacks column(s) {', '.join(missing)}; {_HEADER_HINT}"
            )
        i_time, i_dur, i_gpus = (names.index(c) for c in REQUIRED_COLUMNS)
        i_cluster = names.index("cluster") if "cluster" in names else None
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            name = row[i_cluster] if i_cluster is not None and i_cluster < len(row) else ""
            if cluster is not None and name != cluster:
                continue
            rows.append((*_parse_row(file, line, row, i_time, i_dur, i_gpus), name))
        return rows


def _parse_row(
    file: Path, line: int, row: list[str], i_time: int, i_dur: int, i_gpus: int
) -> tuple[datetime, int, float, int]:
    if max(i_time, i_dur, i_gpus) >= len(row):
        raise UserError(f"trace file '{file}' line {line} has too few fields; {_HEADER_HINT}")
    try:
        submitted = datetime.fromisoformat(row[i_time].strip())
    except ValueError:
        raise UserError(
            f"trace file '{file}' line {line}: bad timestamp '{row[i_time]}'; "
            "expected YYYY-MM-DD HH:MM:SS"
        ) from None
    try:
        duration = float(row[i_dur])
        gpus = int(float(row[i_gpus]))
    except ValueError:
        raise UserError(
            f"trace file '{file}' line {line}: duration '{row[i_dur]}' or num_gpus "
            f"'{row[i_gpus]}' is not a number"
        ) from None
    if not math.isfinite(duration) or duration < 0 or gpus < 1:
        raise UserError(
            f"trace file '{file}' line {line}: need duration >= 0 and num_gpus >= 1, "
            f"got {row[i_dur]} and {row[i_gpus]}"
        )
    return submitted, line, duration, gpus


def write_philly_csv(
    jobs: Sequence[TraceJob], path: str | Path, start: str = "2017-10-01 00:00:00"
) -> Path:
    """Write jobs in Philly format (for examples and round-trip tests)."""
    origin = datetime.fromisoformat(start)
    file = Path(path)
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "duration", "num_gpus", "gpu_time", "cluster"])
        for job in jobs:
            stamp = (origin + timedelta(seconds=round(job.submit_time))).isoformat(sep=" ")
            writer.writerow([stamp, job.duration, job.num_gpus, job.gpu_time, job.cluster])
    return file


def synthetic_trace(
    num_jobs: int,
    *,
    seed: int = 0,
    mean_interarrival: float = 60.0,
    gpu_sizes: Sequence[int] = (1, 2, 4, 8),
    gpu_weights: Sequence[float] = (0.7, 0.1, 0.1, 0.1),
    median_duration: float = 1800.0,
    duration_sigma: float = 1.5,
    max_duration: float = 7 * 86400.0,
    elastic_fraction: float = 0.0,
) -> list[TraceJob]:
    """Poisson arrivals, Philly-like GPU counts, log-normal (heavy-tailed) durations.

    ``elastic_fraction`` of the jobs may run on half to twice their GPU count.
    """
    if num_jobs < 1 or mean_interarrival <= 0 or median_duration <= 0:
        raise UserError("synthetic_trace needs num_jobs >= 1 and positive time scales")
    if len(gpu_sizes) != len(gpu_weights) or not gpu_sizes:
        raise UserError("synthetic_trace needs one weight per GPU size")
    rng = random.Random(seed)
    now = 0.0
    jobs = []
    mu = math.log(median_duration)
    for job_id in range(num_jobs):
        gpus = rng.choices(gpu_sizes, weights=gpu_weights)[0]
        duration = min(max_duration, max(1.0, rng.lognormvariate(mu, duration_sigma)))
        elastic = rng.random() < elastic_fraction
        jobs.append(
            TraceJob(
                job_id,
                round(now, 3),
                round(duration, 3),
                gpus,
                min_gpus=max(1, gpus // 2) if elastic else None,
                max_gpus=gpus * 2 if elastic else None,
            )
        )
        now += rng.expovariate(1.0 / mean_interarrival)
    return jobs
