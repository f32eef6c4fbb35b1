"""The cluster service end to end with real ``distml train`` processes on 1-2 CPU slots.

Each test starts the service through :func:`cluster_up` as ``distml cluster up``
does, submits small MLP jobs (a few seconds of training) and checks what the
scheduler did through its events, and what the jobs computed through their
metrics: every step logged exactly once, and the loss of every step equal to a
solo run of the same config in this process (distml's resume is exact, so time
slicing, migration and a scheduler restart must not change a single loss).
The service and every process it started are killed in ``finally``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distml.cluster.service import cli_api
from distml.cluster.service.executor import JobFiles, latest_checkpoint_step, process_start_id
from distml.cluster.service.store import Store
from distml.testing import free_port

pytestmark = pytest.mark.slow

STEPS = 3000  # longest job (references computed once per seed): long enough to outlast a slice
CONFIG = f"""\
name: tiny
model: {{name: mlp, args: {{in_features: 8, hidden: [64]}}}}
data: {{name: synthetic-classification, num_samples: 40000, num_features: 8, num_classes: 10,
        global_batch_size: 32}}
optimizer: {{name: sgd, lr: 0.02, momentum: 0.9}}
schedule: {{epochs: 100, max_steps: {STEPS}, eval_every_epochs: 0}}
"""
_REFERENCE: dict[int, list[float]] = {}


def reference_losses(tmp: Path, seed: int) -> list[float]:
    """Per-step losses of a solo, uninterrupted run (computed once per seed)."""
    if seed not in _REFERENCE:
        import torch
        import yaml

        from distml import api
        from distml.config import build_config
        from distml.launch import LaunchSpec

        run_dir = tmp / f"solo-{seed}"

        cfg = build_config(
            yaml.safe_load(CONFIG),
            [f"seed={seed}", f"logging.run_dir={run_dir}", "logging.progress=false",
             "parallel.threads_per_worker=1"],
        )  # fmt: skip
        threads = torch.get_num_threads()
        try:
            api.train(cfg, LaunchSpec(nproc=1))
        finally:
            torch.set_num_threads(threads)
        _REFERENCE[seed] = [r["loss"] for r in _records(run_dir / "metrics.jsonl")]
        assert len(_REFERENCE[seed]) == STEPS
    return _REFERENCE[seed]


def _records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "event" not in r]


class Cluster:
    """One service on a state dir under tmp_path, with helpers to drive and inspect it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        (tmp / "train.yaml").write_text(CONFIG)

    def up(self, slots: int = 2, **kw: Any) -> dict[str, Any]:
        kw.setdefault("tick_s", 0.1)
        return cli_api.cluster_up(slots, free_port(), state_dir=self.state_dir, wait_s=120, **kw)

    def job_file(self, name: str, seed: int, steps: int, *extra: str) -> Path:
        path = self.tmp / f"{name}.yaml"
        overrides = [f"seed={seed}", f"schedule.max_steps={steps}", *extra]
        path.write_text(f"name: {name}\nconfig: train.yaml\nslots: 1\noverrides: {overrides}\n")
        return path

    def submit(self, name: str, seed: int, steps: int, *extra: str) -> int:
        job = cli_api.submit(self.job_file(name, seed, steps, *extra), state_dir=self.state_dir)
        return int(job["id"])

    def jobs(self) -> dict[int, dict[str, Any]]:
        return {j["id"]: j for j in cli_api.list_jobs(state_dir=self.state_dir)}

    def events(self, kind: str | None = None, job: int | None = None) -> list[dict[str, Any]]:
        found = cli_api.job_events(job, state_dir=self.state_dir)
        return [e for e in found if kind is None or e["kind"] == kind]

    def metrics(self, job: int) -> list[dict[str, Any]]:
        return _records(self.state_dir / "jobs" / str(job) / "run" / "metrics.jsonl")

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                log = "\n".join(f"{e['job_id']} {e['kind']}: {e['message']}" for e in self.events())
                raise AssertionError(f"timed out waiting for {what}; events:\n{log}")
            time.sleep(0.1)

    def wait_done(self, timeout: float = 240.0) -> dict[int, dict[str, Any]]:
        terminal = ("completed", "failed", "cancelled")
        self.wait("every job to end", lambda: all(
            j["status"] in terminal for j in self.jobs().values()), timeout)  # fmt: skip
        return self.jobs()

    def check_exact(self, job: int, seed: int, steps: int) -> None:
        """Every step once, each loss equal to the solo run's (rtol 1e-5)."""
        records = self.metrics(job)
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        ref = reference_losses(self.tmp, seed)[:steps]
        assert [r["loss"] for r in records] == pytest.approx(ref, rel=1e-5)
        assert self.jobs()[job]["final_loss"] == pytest.approx(ref[-1], rel=1e-5)

    def kill_everything(self) -> None:
        with contextlib.suppress(Exception):
            cli_api.cluster_down(state_dir=self.state_dir, force=True, timeout=30)
        # Belt and braces: any process whose command line names this state dir is ours.
        marker = str(self.state_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.kill_everything()


def test_time_slicing_three_jobs_on_two_slots_keeps_every_loss_exact(cluster: Cluster) -> None:
    # Slices of at least 700 steps: a and b are each preempted once, whatever the speed.
    options = {"quantum": 1, "packing": False}
    cluster.up(policy="gandiva", policy_options=options, min_run_s=0.5, min_run_steps=700)
    a = cluster.submit("a", 0, STEPS)
    b = cluster.submit("b", 1, STEPS)
    c = cluster.submit("c", 0, 500)
    jobs = cluster.wait_done()
    assert [jobs[j]["status"] for j in (a, b, c)] == ["completed"] * 3
    suspends = cluster.events("suspend")
    assert suspends, "no time slicing happened"
    assert all(e["reason"].startswith("time slice of 1s used; job ") for e in suspends)
    resumed = {e["job_id"] for e in cluster.events("resume")}
    assert resumed and resumed <= {e["job_id"] for e in suspends}
    for job in resumed:
        assert jobs[job]["runs"] >= 2
        assert any("resuming from the checkpoint at step" in e["message"]
                   for e in cluster.events("launch", job))  # fmt: skip
    # A slot never held two runs at once (no packing in this test).
    runs = sorted(
        (alloc["start"], alloc["end"], alloc["slots"][0])
        for job in (a, b, c)
        for alloc in cli_api.job_info(job, state_dir=cluster.state_dir)["allocations"]
    )
    for slot in (0, 1):
        spans = [(s, e) for s, e, used in runs if used == slot]
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))
    cluster.check_exact(a, 0, STEPS)
    cluster.check_exact(b, 1, STEPS)
    cluster.check_exact(c, 0, 500)


def test_migration_resumes_from_the_checkpoint_without_losing_a_step(cluster: Cluster) -> None:
    import httpx

    info = cluster.up(policy="fifo")
    token = cluster.state_dir / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        response = httpx.get(info["url"] + "/v1/jobs", headers=headers, timeout=30)
        assert response.status_code == 401, response.text
    job = cluster.submit("m", 0, STEPS)
    cluster.wait("the job to train", lambda: len(cluster.metrics(job)) >= 10, timeout=120)
    # Hold the run still until the migration is decided, so a fast machine cannot finish
    # the job first; it then handles the pending SIGTERM at its next step boundary.
    pid = cluster.jobs()[job]["pid"]
    os.killpg(pid, signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(cli_api.migrate_job, job, [1], state_dir=cluster.state_dir)
            cluster.wait("the migration", lambda: bool(cluster.events("migrate", job)), 30)
        finally:
            os.killpg(pid, signal.SIGCONT)
        moved = pending.result(timeout=120)
    assert moved["placement"] == [1] and moved["runs"] == 2
    done = cluster.wait_done()[job]
    assert done["status"] == "completed"
    migrate = cluster.events("migrate", job)[0]
    assert migrate["message"] == f"migrate job {job} to n0:[1]: requested through the API"
    stopped = cluster.events("stopped", job)[0]["message"]
    step = int(re.search(r"checkpointed at step (\d+)", stopped).group(1))  # type: ignore[union-attr]
    assert 10 <= step < STEPS
    launches = [e["message"] for e in cluster.events("launch", job)]
    assert launches[1].endswith(
        f"on slot(s) [1] with --nproc 1, resuming from the checkpoint at step {step}"
    )
    allocs = cli_api.job_info(job, state_dir=cluster.state_dir)["allocations"]
    assert [(a["slots"], a["outcome"]) for a in allocs] == [([0], "stopped"), ([1], "completed")]
    log = cli_api.job_logs(job, tail=10000, state_dir=cluster.state_dir)
    assert f"at step {step} (epoch" in log
    cluster.check_exact(job, 0, STEPS)


def test_packing_decision_uses_measured_throughput(cluster: Cluster) -> None:
    cluster.up(
        slots=1,
        policy="gandiva",
        policy_options={"quantum": 3600, "packing": True, "trial_packing": True},
        min_run_s=1,
    )
    host = cluster.submit("host", 0, 10**6)
    cluster.wait("the host's solo rate", lambda: bool(cluster.events("throughput", host)), 180)
    joiner = cluster.submit("joiner", 1, 10**6)
    cluster.wait("a packing measurement", lambda: any(
        "normalized sum" in e["message"] for e in cluster.events("throughput", joiner)), 180)  # fmt: skip
    pack = cluster.events("pack", joiner)
    assert pack[0]["message"] == (
        f"pack job {joiner} with job {host} on n0:[0]: trial packing: pair throughput not "
        "measured yet"
    )
    message = [e for e in cluster.events("throughput", joiner) if "normalized" in e["message"]]
    values = {
        int(m.group(1)): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
        for m in re.finditer(r"job (\d+) (\d+) samples/s = ([\d.]+) x (\d+)", message[0]["message"])
    }
    assert set(values) == {host, joiner}
    for rate, normalized, solo in values.values():
        assert normalized == pytest.approx(rate / solo, abs=0.006)  # printed with 2 decimals
    # Wall-clock rates from metrics.jsonl: no faster than the job's fastest logged step.
    for job in (host, joiner):
        logged = [r["samples_per_s"] for r in cluster.metrics(job)]
        assert 0 < values[job][0] <= max(logged) * 1.05
    a, b = values[host][1], values[joiner][1]
    # The policy compares the exact values with 1; the event prints them rounded.
    deadline = time.monotonic() + 5
    while not cluster.events("unpack") and time.monotonic() < deadline:
        time.sleep(0.2)
    unpacks = cluster.events("unpack")
    if unpacks:
        # Packing lost to time-sharing: the joiner is unpacked, citing the measurement.
        reason = unpacks[0]["reason"]
        found = re.fullmatch(
            r"packed throughput ([\d.]+) \+ ([\d.]+) = ([\d.]+) <= 1: time-share instead", reason
        )
        assert found is not None and unpacks[0]["job_id"] == joiner, reason
        assert float(found.group(1)) == pytest.approx(a, abs=0.011)
        assert float(found.group(2)) == pytest.approx(b, abs=0.011)
        assert a + b <= 1.02
        cluster.wait("the joiner to be suspended",
                     lambda: cluster.jobs()[joiner]["status"] == "suspended", 60)  # fmt: skip
    else:
        assert a + b >= 0.98, "packing lost but the pair was not unpacked"
        jobs = cluster.jobs()
        assert jobs[host]["placement"] == jobs[joiner]["placement"] == [0]
    # A graceful `cluster down` checkpoints every run at its last step, for the next `up`.
    cli_api.cluster_down(state_dir=cluster.state_dir, timeout=60)
    store = Store(cluster.state_dir / "cluster.db")
    for job in (host, joiner):
        assert store.get_job(job).status == "suspended", store.events()
        files = JobFiles(cluster.state_dir / "jobs" / str(job))
        last = cluster.metrics(job)[-1]["step"]
        assert latest_checkpoint_step(files) == last, store.events(job)
    store.close()


def test_scheduler_restart_loses_no_job(cluster: Cluster) -> None:
    cluster.up(policy="fifo")
    a = cluster.submit("a", 0, STEPS)
    b = cluster.submit("b", 1, STEPS, "checkpoint.every_steps=100")
    c = cluster.submit("c", 0, 500)
    cluster.wait("both runs to start", lambda: all(
        cluster.jobs()[j]["pid"] for j in (a, b)), 120)  # fmt: skip
    jobs = cluster.jobs()
    # Pause each run once it is past a periodic checkpoint, so neither finishes while the
    # service is away; then kill the service (its runs survive it) and b's run, which is
    # lost between two checkpoints.
    paused: set[int] = set()

    def pause_when_past_a_checkpoint() -> bool:
        for job in {a, b} - paused:
            if len(cluster.metrics(job)) >= 150:
                os.killpg(jobs[job]["pid"], signal.SIGSTOP)
                paused.add(job)
        return paused == {a, b}

    cluster.wait("both runs past a periodic checkpoint", pause_when_past_a_checkpoint, 180)
    info = json.loads((cluster.state_dir / "service.json").read_text())
    os.kill(info["pid"], signal.SIGKILL)
    os.killpg(jobs[b]["pid"], signal.SIGKILL)
    cluster.wait("the service to die", lambda: process_start_id(info["pid"]) is None, 30)
    try:
        cluster.up(policy="fifo")
    finally:
        os.killpg(jobs[a]["pid"], signal.SIGCONT)
    reattach = cluster.events("reattach", a)
    assert reattach and reattach[0]["reason"] == (
        f"re-attached after a scheduler restart (pid {jobs[a]['pid']}, same start time)"
    )
    assert cluster.events("recover", b)[0]["message"] == (
        f"job {b}: its run (pid {jobs[b]['pid']}) is gone after the scheduler restart; "
        "it resumes from its last checkpoint"
    )
    relaunch = cluster.events("launch", b)[-1]["message"]
    step = int(relaunch.rsplit(" ", 1)[1])  # "... resuming from the checkpoint at step N"
    assert step >= 100 and step % 100 == 0
    final = cluster.wait_done()
    assert [final[j]["status"] for j in (a, b, c)] == ["completed"] * 3
    assert final[a]["runs"] == 1  # never restarted: re-attached
    assert final[b]["runs"] == 2
    cluster.check_exact(a, 0, STEPS)
    cluster.check_exact(b, 1, STEPS)
    cluster.check_exact(c, 0, 500)
