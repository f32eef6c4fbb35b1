"""Philly CSV loading (windows, filters, errors) and seeded synthetic traces."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import pytest

from distml.cluster import load_philly_trace, synthetic_trace
from distml.cluster.trace import write_philly_csv
from distml.errors import UserError

# shared/ sits beside the project checkout
PHILLY = Path(__file__).resolve().parents[3] / "shared" / "data" / "philly_jobs.csv"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.skipif(not PHILLY.is_file(), reason="shared Philly trace not present")
def test_philly_window_matches_an_independent_read() -> None:
    trace = load_philly_trace(PHILLY, offset=1_000, limit=300)
    with PHILLY.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # independent reference: stable sort by timestamp, same window
    rows.sort(key=lambda r: datetime.fromisoformat(r["timestamp"]))
    window = rows[1_000:1_300]
    assert len(trace.jobs) == 300 and trace.skipped == 0
    start = datetime.fromisoformat(window[0]["timestamp"])
    for job, row in zip(trace.jobs, window, strict=True):
        assert job.duration == float(row["duration"])
        assert job.num_gpus == int(row["num_gpus"])
        assert job.cluster == row["cluster"]
        assert job.submit_time == (datetime.fromisoformat(row["timestamp"]) - start).total_seconds()
    assert trace.jobs[0].submit_time == 0.0
    assert [j.job_id for j in trace.jobs] == list(range(1_000, 1_300))


@pytest.mark.skipif(not PHILLY.is_file(), reason="shared Philly trace not present")
def test_philly_oversize_jobs_are_skipped_and_counted_or_rejected() -> None:
    trace = load_philly_trace(PHILLY, limit=3_000, max_gpus=8)
    full = load_philly_trace(PHILLY, limit=3_000)
    big = [j for j in full.jobs if j.num_gpus > 8]
    assert big and trace.skipped == len(big)
    assert len(trace.jobs) == 3_000 - len(big)
    assert all(j.num_gpus <= 8 for j in trace.jobs)
    with pytest.raises(UserError, match=r"needing more than 8 GPUs \(largest \d+\); use more"):
        load_philly_trace(PHILLY, limit=3_000, max_gpus=8, oversize="error")


def test_extra_and_reordered_columns_and_cluster_filter(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.csv",
        "cluster,num_gpus,user,timestamp,duration\n"
        "a,2,u1,2017-10-01 00:00:10,50\n"
        "b,1,u2,2017-10-01 00:00:00,20\n"
        "a,4,u3,2017-10-01 00:01:00,30.5\n",
    )
    trace = load_philly_trace(path)
    assert [(j.submit_time, j.duration, j.num_gpus) for j in trace.jobs] == [
        (0.0, 20.0, 1),
        (10.0, 50.0, 2),
        (60.0, 30.5, 4),
    ]
    only_a = load_philly_trace(path, cluster="a")
    assert [(j.submit_time, j.num_gpus) for j in only_a.jobs] == [(0.0, 2), (50.0, 4)]
    assert [j.job_id for j in load_philly_trace(path, offset=1, limit=1).jobs] == [1]


def test_missing_file_and_columns_give_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(UserError) as err:
        load_philly_trace(missing)
    assert str(err.value) == (
        f"trace file '{missing}' not found; pass a Philly-format CSV "
        "(expected header timestamp,duration,num_gpus[,gpu_time,cluster])"
    )
    path = _write(tmp_path / "cols.csv", "timestamp,gpus\n2017-10-01 00:00:00,1\n")
    with pytest.raises(UserError) as err:
        load_philly_trace(path)
    assert str(err.value) == (
        f"trace file '{path}' lacks column(s) duration, num_gpus; "
        "expected header timestamp,duration,num_gpus[,gpu_time,cluster]"
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "is empty"),
        ("timestamp,duration,num_gpus\n", "has no jobs"),
        ("timestamp,duration,num_gpus\nyesterday,10,1\n", "line 2: bad timestamp 'yesterday'"),
        ("timestamp,duration,num_gpus\n2017-10-01 00:00:00,ten,1\n", "line 2: duration 'ten'"),
        ("timestamp,duration,num_gpus\n2017-10-01 00:00:00,10,0\n", "num_gpus >= 1"),
        ("timestamp,duration,num_gpus\n2017-10-01 00:00:00,10\n", "line 2 has too few fields"),
    ],
)
def test_bad_rows_name_the_line(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path / "bad.csv", body)
    with pytest.raises(UserError, match=message):
        load_philly_trace(path)


def test_window_past_the_end_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "timestamp,duration,num_gpus\n2017-10-01 00:00:00,5,1\n")
    with pytest.raises(UserError, match=r"offset 3 is past the end .* \(1 jobs\)"):
        load_philly_trace(path, offset=3)
    with pytest.raises(UserError, match="has no jobs for cluster 'x'"):
        load_philly_trace(
            _write(tmp_path / "c.csv", "timestamp,duration,num_gpus,cluster\n"), cluster="x"
        )


def test_synthetic_trace_is_seeded_and_round_trips_through_csv(tmp_path: Path) -> None:
    a = synthetic_trace(200, seed=3, elastic_fraction=0.5)
    assert a == synthetic_trace(200, seed=3, elastic_fraction=0.5)
    assert a != synthetic_trace(200, seed=4, elastic_fraction=0.5)
    assert [j.submit_time for j in a] == sorted(j.submit_time for j in a)
    assert {j.num_gpus for j in a} <= {1, 2, 4, 8}
    elastic = [j for j in a if j.min_gpus is not None]
    assert 50 < len(elastic) < 150
    assert all(
        j.min_gpus == max(1, j.num_gpus // 2) and j.max_gpus == 2 * j.num_gpus for j in elastic
    )
    back = load_philly_trace(write_philly_csv(a, tmp_path / "s.csv"))
    assert [(j.num_gpus, j.duration) for j in back.jobs] == [(j.num_gpus, j.duration) for j in a]
    assert [j.submit_time for j in back.jobs] == [round(j.submit_time) for j in a]
