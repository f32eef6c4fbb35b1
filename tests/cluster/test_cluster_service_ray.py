"""The Ray executor against a real local Ray instance: placement, rendezvous, stop, resume.

One Ray instance (2 CPUs, 2 ``distml_slot``) serves the whole module. A job
submitted to the scheduler service with ``--executor ray`` trains on two Ray
actors (two ranks joined through torch.distributed) and ends with the loss of a
solo run in this process; a 2-rank run suspended with SIGTERM, released and
resumed on 1 slot logs every step exactly once with the solo losses. Skipped
when ``ray`` is not installed (test_cluster_service.py checks the UserError).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

CONFIG: dict[str, Any] = {
    "model": {"name": "mlp", "args": {"in_features": 8, "hidden": [32]}},
    "data": {
        "name": "synthetic-classification",
        "num_features": 8,
        "num_samples": 4096,
        "global_batch_size": 32,
    },
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"epochs": 100, "max_steps": 60, "eval_every_epochs": 0},
}
_REFERENCE: dict[int, list[float]] = {}


def reference_losses(tmp: Path, steps: int) -> list[float]:
    """Per-step losses of an uninterrupted single-process run in this process."""
    if steps not in _REFERENCE:
        import torch

        from distml import api
        from distml.config import build_config
        from distml.launch import LaunchSpec

        run_dir = tmp / f"solo-{steps}"
        cfg = build_config(
            CONFIG,
            [f"schedule.max_steps={steps}", f"logging.run_dir={run_dir}",
             "logging.progress=false", "parallel.threads_per_worker=1"],
        )  # fmt: skip
        threads = torch.get_num_threads()
        try:
            api.train(cfg, LaunchSpec(nproc=1))
        finally:
            torch.set_num_threads(threads)
        _REFERENCE[steps] = [r["loss"] for r in _records(run_dir / "metrics.jsonl")]
    return _REFERENCE[steps]


def _records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "event" not in r]


def _wait(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    import ray

    ray.init(
        num_cpus=2,
        resources={"distml_slot": 2},
        include_dashboard=False,
        namespace="distml-test",
        log_to_driver=False,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def _wait_exit(ex: Any, proc: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (ended := ex.poll(proc)) is None:
        assert time.monotonic() < deadline, "timed out waiting for the run to end"
        time.sleep(0.1)
    return ended


def _files(tmp: Path, steps: int) -> JobFiles:
    files = JobFiles(tmp / "job")
    files.job_dir.mkdir(parents=True)
    config = {**CONFIG, "schedule": {**CONFIG["schedule"], "max_steps": steps}}
    files.config.write_text(yaml.safe_dump(config))
    prepare_run(files)
    return files


def _slots_free() -> float:
    import ray

    return float(ray.available_resources().get("distml_slot", 0.0))


def test_service_runs_a_two_rank_job_on_ray_with_the_solo_loss(
    ray_address: str, tmp_path: Path
) -> None:
    from distml.cluster.service import cli_api
    from distml.testing import free_port

    state = tmp_path / "state"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(CONFIG))
    spec = tmp_path / "job.yaml"
    spec.write_text("name: r\nconfig: train.yaml\nslots: 2\n")
    try:
        info = cli_api.cluster_up(
            None, free_port(), policy="fifo", executor="ray",
            executor_options={"address": ray_address}, state_dir=state, tick_s=0.1,
        )  # fmt: skip
        assert info["slots"] == 2  # the Ray cluster's distml_slot resources
        job = int(cli_api.submit(spec, state_dir=state)["id"])
        terminal = ("completed", "failed", "cancelled")

        def status() -> str:
            return str({j["id"]: j for j in cli_api.list_jobs(state_dir=state)}[job]["status"])

        _wait("the ray job to end", lambda: status() in terminal, timeout=180)
        log = cli_api.job_logs(job, 400, state_dir=state)
        assert status() == "completed", log
        assert "rank 0/2 on ray" in log and "rank 1/2 on ray" in log
        records = _records(state / "jobs" / str(job) / "run" / "metrics.jsonl")
        ref = reference_losses(tmp_path, 60)
        assert [r["step"] for r in records] == list(range(1, 61))
        assert [r["loss"] for r in records] == pytest.approx(ref, rel=1e-5)
        summary = json.loads((state / "jobs" / str(job) / "summary.json").read_text())
        assert summary["world_size"] == 2
    finally:
        with contextlib.suppress(Exception):
            cli_api.cluster_down(state_dir=state, force=True, timeout=30)
    _wait("the placement group to be released", lambda: _slots_free() == 2.0, timeout=30)


def test_suspend_on_two_ranks_then_resume_on_one_loses_no_step(
    ray_address: str, tmp_path: Path
) -> None:
    from distml.cluster.executors.ray_executor import RayExecutor

    steps = 400
    ex = RayExecutor()
    assert ex.default_slots() == 2
    files = _files(tmp_path, steps)
    proc = ex.launch(LaunchRequest(7, files, str(tmp_path), (0, 1), 1))
    try:
        assert _slots_free() == 0.0  # both bundles reserved by the PACK group
        found = ex.attach(7, proc.pid, proc.start_id, (0, 1), files)
        assert found is not None and len(found.handle.workers) == 2
        _wait("a few steps", lambda: len(_records(files.metrics)) >= 5)
        ex.request_stop(proc)
        stopped = _wait_exit(ex, proc, 120)
    except BaseException:
        ex.kill(proc)
        raise
    kind, detail = classify_exit(proc, stopped)
    assert (kind, stopped.returncode) == ("stopped", 0), detail
    _wait("the placement group to be released", lambda: _slots_free() == 2.0, timeout=30)
    step, ckpt = prepare_run(files)
    assert 0 < step < steps and ckpt is not None
    proc = ex.launch(LaunchRequest(7, files, str(tmp_path), (1,), 2, resume=ckpt))
    try:
        ended = _wait_exit(ex, proc, 120)
    except BaseException:
        ex.kill(proc)
        raise
    assert classify_exit(proc, ended) == ("completed", f"finished {steps} steps")
    records = _records(files.metrics)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["loss"] for r in records] == pytest.approx(
        reference_losses(tmp_path, steps), rel=1e-5
    )
