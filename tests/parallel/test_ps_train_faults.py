"""Faults of the ps strategy under ``distml train`` (the launcher and the Trainer).

``distml train`` with ps async (W=2, S=1): SIGKILL of worker 1 mid-run; the job
  ends with exit 0, worker 0 completes every step and the server log says the
  worker was dropped. SIGKILL of the server stops the job within 30 s naming it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

EPOCHS = 15  # ~330 steps: the job is still running when the kill lands
ARGV = [
    "train",
    "model.name=mlp",
    "model.args.hidden=[64]",
    "data.name=digits",
    "data.global_batch_size=64",
    f"schedule.epochs={EPOCHS}",
    "schedule.eval_every_epochs=0",
    "optimizer.name=sgd",
    "optimizer.lr=0.1",
    "parallel.strategy=ps",
    "parallel.servers=1",
    "parallel.workers=2",
    "parallel.consistency=async",
    "logging.progress=false",
    "--nproc",
    "3",
]


def _workers_by_rank(launcher: int) -> list[int]:
    """The launcher's spawned worker processes, by start time (= local rank order)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == launcher and b"spawn_main" in cmdline:
            found.append((int(stat[19]), int(entry)))
    return [pid for _, pid in sorted(found)]


def _run_and_kill(tmp_path: Path, victim: int) -> tuple[int, str, float]:
    """Start the job, SIGKILL global rank ``victim`` after 5 logged steps; (rc, stderr, s)."""
    metrics = tmp_path / "metrics.jsonl"
    out, err = (tmp_path / "out.txt").open("w+"), (tmp_path / "err.txt").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", *ARGV, f"logging.run_dir={tmp_path}"],
        stdout=out,
        stderr=err,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 150
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        workers = _workers_by_rank(proc.pid)
        assert len(workers) == 3, workers
        os.kill(workers[victim], signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=120)
        return proc.returncode, (tmp_path / "err.txt").read_text(), time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        err.close()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker pids")
def test_killed_async_worker_is_dropped_and_training_finishes(tmp_path: Path) -> None:
    code, stderr, _ = _run_and_kill(tmp_path, victim=1)
    assert code == 0, stderr[-3000:]
    assert "distml: worker rank 1 died (killed by signal 9); dropped" in stderr
    assert "parameter server 0: worker rank 1 lost (" in stderr
    assert "dropped, continuing with 1 worker(s)" in stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 1437 // 64  # digits: 1437 training samples, the last partial batch dropped
    assert records[-1]["step"] == EPOCHS * steps_per_epoch  # worker 0 finished the schedule


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker pids")
def test_killed_server_stops_the_job_quickly_with_a_clear_message(tmp_path: Path) -> None:
    code, stderr, seconds = _run_and_kill(tmp_path, victim=2)
    assert code not in (0, None)
    assert (
        "parameter server 0 (rank 2) died (killed by signal 9); its parameter shard is lost, "
        "so the job stops" in stderr
    )
    assert seconds < 30


def test_ps_roles_make_workers_expendable_only_in_async_and_ssp() -> None:
    from distml.launch.launcher import ps_roles

    def job(consistency: str) -> list[dict[str, Any]]:
        parallel = {"strategy": "ps", "workers": 3, "servers": 2, "consistency": consistency}
        return [{"parallel": parallel}]

    names = {3: "parameter server 0 (rank 3)", 4: "parameter server 1 (rank 4)"}
    assert ps_roles(job("async")) == (frozenset({0, 1, 2}), names)
    assert ps_roles(job("ssp")) == (frozenset({0, 1, 2}), names)
    assert ps_roles(job("sync")) == (frozenset(), names)
    assert ps_roles([{"parallel": {"strategy": "ddp"}}]) == (frozenset(), {})
    assert ps_roles(()) == (frozenset(), {})
