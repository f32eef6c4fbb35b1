"""The Ray executor runs a real job to completion and stops one with a checkpoint.

Needs the optional ``ray`` package (a local Ray instance is started); without
it these tests skip, and test_cluster_service.py checks the clear UserError.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import yaml

from distml.cluster.service.executor import (
    JobFiles,
    LaunchRequest,
    classify_exit,
    prepare_run,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed"),
]

CONFIG = {
    "model": {"name": "mlp", "args": {"in_features": 8, "hidden": [16]}},
    "data": {"name": "synthetic-classification", "num_features": 8, "num_samples": 2048},
    "schedule": {"epochs": 1000, "max_steps": 40, "eval_every_epochs": 0},
}


def _files(tmp_path: Path, steps: int) -> JobFiles:
    files = JobFiles(tmp_path / "job")
    files.job_dir.mkdir(parents=True)
    config = {**CONFIG, "schedule": {**CONFIG["schedule"], "max_steps": steps}}
    files.config.write_text(yaml.safe_dump(config))
    prepare_run(files)
    return files


def test_ray_executor_runs_and_stops_jobs(tmp_path: Path) -> None:
    import ray

    from distml.cluster.executors.ray_executor import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, namespace="distml-test")
    try:
        ex = RayExecutor()
        files = _files(tmp_path / "a", 40)
        proc = ex.launch(LaunchRequest(1, files, str(tmp_path), (0,), 1))
        deadline = time.monotonic() + 180
        while (ended := ex.poll(proc)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert classify_exit(proc, ended) == ("completed", "finished 40 steps")
        long = _files(tmp_path / "b", 10**6)
        proc = ex.launch(LaunchRequest(2, long, str(tmp_path), (0,), 1))
        while not long.metrics.exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ex.attach(2, proc.pid, proc.start_id, (0,), long) is not None
        ex.request_stop(proc)
        while (ended := ex.poll(proc)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert classify_exit(proc, ended)[0] == "stopped"
    finally:
        ray.shutdown()
