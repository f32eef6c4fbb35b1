"""Cluster service pieces without real jobs: job specs, store, run files, throughput,
the scheduler loop over a scripted executor (packing from measured rates, preemption
guard, restart recovery, cancel) and the HTTP API (token, one-line errors)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distml.cluster.policies import build_policy
from distml.cluster.service.executor import (
    Executor,
    Exit,
    JobFiles,
    JobProcess,
    LaunchRequest,
    classify_exit,
    prepare_run,
    process_start_id,
    train_command,
)
from distml.cluster.service.jobspec import (
    SpecError,
    SpecSyntaxError,
    parse_spec_text,
    resolve_spec,
)
from distml.cluster.service.scheduler_loop import (
    JobConflict,
    Scheduler,
    SchedulerOptions,
)
from distml.cluster.service.server import ServicePaths, new_token
from distml.cluster.service.store import Store
from distml.cluster.service.throughput import MetricsTail, training_signature
from distml.cluster.state import JobStatus, SimulatedClock
from distml.errors import UserError

TINY = "config: {model: {name: mlp}, data: {name: synthetic-classification}}\nslots: 1\n"


# ---------------------------------------------------------------- job specs
def _resolve(text: str, tmp_path: Path, cluster_slots: int = 2, **kw: Any) -> Any:
    return resolve_spec(
        parse_spec_text(text),
        base_dir=tmp_path,
        workdir=tmp_path,
        cluster_slots=cluster_slots,
        **kw,
    )


VALID = "config, elastic, gpus, name, overrides, priority, slots"


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (
            "config: [unclosed\n",
            SpecSyntaxError,
            "job spec is not valid YAML at line 2; fix the syntax",
        ),
        (
            "- a\n- b\n",
            SpecSyntaxError,
            "job spec is a list, not a mapping; write fields such as 'config:' and 'slots:'",
        ),
        ("gpu: 2\n", SpecError, f"unknown field 'gpu' in the job spec; valid fields: {VALID}"),
        (
            "elastic: {min: 1, max: 2, step: 1}\n",
            SpecError,
            f"unknown field 'elastic.step' in the job spec; valid fields: {VALID}",
        ),
        (
            "slots: 0\n",
            SpecError,
            "invalid job spec value for 'slots': Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "slots: 3\n",
            SpecError,
            "job 'job' asks for 3 slots but the cluster has 2; lower slots or start the cluster with --slots 3",
        ),
        (
            "name: big\nelastic: {min: 3, max: 4}\n",
            SpecError,
            "job 'big' needs 3 slots but the cluster has 2; lower slots (or elastic.min) or start the cluster with --slots 3",
        ),
        (
            "elastic: {min: 2, max: 1}\n",
            SpecError,
            "invalid job spec: elastic.min=2 exceeds elastic.max=1",
        ),
        (
            "slots: 1\ngpus: 2\n",
            SpecError,
            "invalid job spec: slots=1 and gpus=2 disagree; give one of them",
        ),
        (
            "name: 'a b'\n",
            SpecError,
            "invalid job spec: name 'a b' must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit",
        ),
        (
            "config: {optimizer: {lrr: 1}}\nslots: 1\n",
            SpecError,
            "unknown config key 'optimizer.lrr' in the job spec's config; check the spelling (see `distml config`)",
        ),
        (
            "config: {data: {global_batch_size: 6}}\nslots: 1\nelastic: {min: 1, max: 4}\n",
            SpecError,
            "job 'job': data.global_batch_size=6 is not divisible by 4 workers x 1 accumulation steps; use a multiple of 12 such as 12",
        ),
    ],
)
def test_bad_job_specs_fail_with_one_clear_line(
    tmp_path: Path, text: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        _resolve(text, tmp_path, cluster_slots=4 if "batch_size: 6" in text else 2)
    assert str(info.value) == message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        _resolve("config: nope.yaml\nslots: 1\n", tmp_path)
    assert str(info.value) == (
        f"config file not found: {tmp_path / 'nope.yaml'}; pass an existing YAML file"
    )


def test_spec_resolves_relative_config_overrides_and_cli_flags(tmp_path: Path) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "train.yaml").write_text("model: {name: mlp}\noptimizer: {lr: 0.2}\n")
    spec = parse_spec_text(
        "name: a\nconfig: train.yaml\noverrides: [seed=7]\ngpus: 1\npriority: 3\n"
    )
    job = resolve_spec(
        spec, base_dir=tmp_path / "cfgs", workdir=tmp_path, cluster_slots=4, slots=2, priority=9
    )
    assert (job.name, job.slots, job.min_slots, job.max_slots, job.priority) == ("a", 2, 2, 2, 9)
    assert job.config["optimizer"]["lr"] == 0.2 and job.config["seed"] == 7
    assert job.config["parallel"]["nproc"] == 2 and job.config["checkpoint"]["resume"] is False
    elastic = _resolve("elastic: {min: 1, max: 2}\nconfig: {parallel: {nproc: 4}}\n", tmp_path)
    assert (elastic.slots, elastic.min_slots, elastic.max_slots) == (2, 1, 2)


# -------------------------------------------------------------------- store
def test_store_keeps_jobs_allocations_and_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    a = store.add_job(name="a", slots=1, min_slots=1, max_slots=1, priority=0, workdir="/w")
    b = store.add_job(name="b", slots=2, min_slots=1, max_slots=2, priority=5, workdir="/w")
    store.update_job(a.id, status="running", placement=[1], pid=42, pid_start="99")
    store.open_allocation(a.id, [1], 1, 42)
    store.close_allocations(a.id, "stopped")
    first = store.add_event("start", "start job 1", a.id, "why")
    store.add_event("submit", "submit job 2", b.id)
    store.close()
    again = Store(tmp_path / "c.db")  # everything survives a reopen
    rec = again.get_job(a.id)
    assert (rec.status, rec.placement, rec.pid, rec.pid_start) == ("running", [1], 42, "99")
    assert [r.id for r in again.list_jobs(["running"])] == [a.id]
    assert [r.name for r in again.find_jobs("b")] == ["b"]
    alloc = again.allocations(a.id)
    assert alloc[0]["slots"] == [1] and alloc[0]["outcome"] == "stopped" and alloc[0]["end"]
    assert [e["kind"] for e in again.events()] == ["start", "submit"]
    assert [e["message"] for e in again.events(since=first)] == ["submit job 2"]
    assert again.events(job_id=a.id)[0]["reason"] == "why"
    with pytest.raises(KeyError):
        again.update_job(a.id, colour="red")


def test_token_file_is_private(tmp_path: Path) -> None:
    paths = ServicePaths(tmp_path)
    token = new_token(paths)
    assert len(token) >= 32 and paths.token.read_text().strip() == token
    assert stat.S_IMODE(paths.token.stat().st_mode) == 0o600
    assert new_token(paths) != token  # a new one at every start


# ---------------------------------------------------------------- run files
def _steps(files: JobFiles, start: int, count: int, rate: float = 100.0) -> None:
    """Step records as the trainer writes them; each step takes 1 s at ``rate``."""
    files.metrics.parent.mkdir(parents=True, exist_ok=True)
    with files.metrics.open("a") as fh:
        for step in range(start, start + count):
            record = {"step": step, "loss": 1.0 / step, "samples_per_s": rate, "t_step": 1.0}
            fh.write(json.dumps(record) + "\n")


def test_prepare_run_trims_metrics_to_the_resumed_checkpoint(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "job")
    _steps(files, 1, 10)
    with files.metrics.open("a") as fh:
        fh.write(json.dumps({"event": "eval", "step": 5, "loss": 0.5}) + "\n")
        fh.write(json.dumps({"event": "eval", "step": 9, "loss": 0.4}) + "\n")
        fh.write('{"step": 11, "lo')  # cut short by a kill
    files.checkpoints.mkdir(parents=True)
    for step in (3, 6, 12):  # step 12 was saved but its metric lines never reached the file
        (files.checkpoints / f"step_{step:08d}.pt").write_bytes(b"x")
    files.summary.write_text("{}")
    assert prepare_run(files) == (6, files.checkpoints / "step_00000006.pt")
    records = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "event" in r] == [5]
    assert not files.summary.exists()
    assert sorted(p.name for p in files.checkpoints.iterdir()) == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    assert [p.name for p in files.superseded.iterdir()] == ["step_00000012.pt"]
    assert prepare_run(files) == (6, files.checkpoints / "step_00000006.pt")  # idempotent
    files.metrics.write_text("")  # nothing logged: every checkpoint is ahead of the metrics
    assert prepare_run(files) == (0, None) and not files.metrics.exists()  # starts over


def test_train_command_resumes_on_the_slots_worker_count(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    cmd = train_command(files, 3, cpu_threads=True, resume=tmp_path / "step_00000005.pt")
    assert cmd[:5] == [sys.executable, "-m", "distml", "train", str(files.config)]
    assert f"logging.run_dir={files.run_dir}" in cmd and "parallel.threads_per_worker=1" in cmd
    assert cmd[cmd.index("--nproc") + 1] == "3"
    assert cmd[cmd.index("--resume") + 1] == str(tmp_path / "step_00000005.pt")
    assert cmd[cmd.index("--summary-json") + 1] == str(files.summary)
    assert "--resume" not in train_command(files, 1, cpu_threads=False)


def test_classify_exit(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    proc = JobProcess(1, 1, "x", (0,), files)
    files.log.write_text("=== distml cluster: run 1 ===\nTraceback\nValueError: boom\n")
    assert classify_exit(proc, Exit(1)) == ("failed", "exit code 1: ValueError: boom")
    assert classify_exit(proc, Exit(0))[0] == "stopped"  # multi-worker stop: no summary
    files.summary.write_text(json.dumps({"stopped_by_signal": True, "steps": 7}))
    assert classify_exit(proc, Exit(0)) == ("stopped", "checkpointed at step 7")
    files.summary.write_text(json.dumps({"stopped_by_signal": False, "steps": 9}))
    assert classify_exit(proc, Exit(0)) == ("completed", "finished 9 steps")
    files.summary.unlink()
    proc.stop_requested = True  # SIGTERM while still importing: died before the handler
    assert classify_exit(proc, Exit(-15))[0] == "stopped"


def test_process_identity_tells_a_live_run_from_a_recycled_pid(tmp_path: Path) -> None:
    from distml.cluster.executors.local import LocalExecutor

    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = process_start_id(sleeper.pid)
        assert start
        ex = LocalExecutor(device="cpu")
        files = JobFiles(tmp_path)
        found = ex.attach(1, sleeper.pid, start, (0,), files)
        assert found is not None and ex.poll(found) is None
        assert ex.attach(1, sleeper.pid, start + "0", (0,), files) is None  # other start time
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
        assert process_start_id(sleeper.pid) is None
        assert ex.poll(found) == Exit(None)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_metrics_tail_returns_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step"')
    tail = MetricsTail(path)
    assert tail.read() == [{"step": 1}]
    with path.open("a") as fh:
        fh.write(": 2}\n")
    assert tail.read() == [{"step": 2}] and tail.read() == []


def test_training_signature_ignores_seed_name_and_length() -> None:
    a = {"name": "a", "seed": 1, "model": {"name": "mlp"}, "schedule": {"max_steps": 5}}
    b = {"name": "b", "seed": 2, "model": {"name": "mlp"}, "schedule": {"max_steps": 9}}
    c = {"name": "a", "seed": 1, "model": {"name": "cnn"}, "schedule": {"max_steps": 5}}
    assert training_signature(a) == training_signature(b) != training_signature(c)


# ------------------------------------------------- scheduler, scripted runs
class ScriptedExecutor(Executor):
    """Runs nothing: the test writes metrics and decides when runs end."""

    name = "scripted"

    def __init__(self) -> None:
        self.procs: dict[int, JobProcess] = {}
        self.launches: list[tuple[int, tuple[int, ...]]] = []
        self.alive: set[int] = set()

    def launch(self, request: LaunchRequest) -> JobProcess:
        request.files.run_dir.mkdir(parents=True, exist_ok=True)
        pid = 1000 + len(self.launches)
        proc = JobProcess(request.job_id, pid, "t0", request.slots, request.files, {"rc": None})
        self.procs[request.job_id] = proc
        self.launches.append((request.job_id, request.slots))
        return proc

    def poll(self, proc: JobProcess) -> Exit | None:
        if proc.handle is None:  # re-attached
            return None if proc.pid in self.alive else Exit(None)
        rc = proc.handle["rc"]
        return None if rc is None else Exit(rc)

    def request_stop(self, proc: JobProcess) -> None:
        proc.stop_requested = True
        proc.files.summary.write_text(json.dumps({"stopped_by_signal": True, "steps": 1}))
        proc.handle["rc"] = 0

    def kill(self, proc: JobProcess) -> None:
        proc.handle["rc"] = -9

    def attach(
        self, job_id: int, pid: int, start_id: str, slots: tuple[int, ...], files: JobFiles
    ) -> JobProcess | None:
        return JobProcess(job_id, pid, start_id, slots, files) if pid in self.alive else None

    def complete(self, job_id: int) -> None:
        proc = self.procs[job_id]
        proc.files.summary.write_text(json.dumps({"stopped_by_signal": False, "steps": 3}))
        proc.handle["rc"] = 0


def _scheduler(
    tmp_path: Path, slots: int = 1, policy: str = "gandiva", **policy_options: Any
) -> tuple[Scheduler, ScriptedExecutor]:
    ex = ScriptedExecutor()
    options = SchedulerOptions(min_run_s=0.0, measure_seconds=1.0, measure_steps=5)
    policy_obj = build_policy(policy, **policy_options)
    clock = SimulatedClock(1000.0)
    sched = Scheduler(
        Store(tmp_path / "c.db"), ex, policy_obj, slots, tmp_path, options, clock=clock
    )
    sched.recover()
    return sched, ex


def _tick(sched: Scheduler, seconds: float = 1.0) -> None:
    clock = sched.clock
    assert isinstance(clock, SimulatedClock)
    clock.advance_to(clock.now() + seconds)
    sched.run_once()


def _submit(sched: Scheduler, tmp_path: Path, text: str = TINY) -> int:
    return sched.submit(_resolve(text, tmp_path, sched.num_slots)).id


def _kinds(sched: Scheduler, job: int | None = None) -> list[str]:
    return [e["kind"] for e in sched.store.events(job)]


def _measure(sched: Scheduler, rates: dict[int, float]) -> None:
    """Run each job at ``rates`` samples/s for 2 s (5 steps per second).

    The first second's records only open the window (they may predate the context).
    """
    for _ in range(2):
        for job_id, rate in rates.items():
            files = sched.files(job_id)
            last = sum(1 for _ in files.metrics.open()) if files.metrics.exists() else 0
            _steps(files, last + 1, 5, rate / 5)
        _tick(sched)


def _pack_two(
    tmp_path: Path, solo: float, rate_a: float, rate_b: float
) -> tuple[Scheduler, ScriptedExecutor]:
    sched, ex = _scheduler(tmp_path, quantum=3600, packing=True, trial_packing=True)
    a = _submit(sched, tmp_path)
    sched.run_once()
    _steps(sched.files(a), 1, 1)
    sched.run_once()  # first step seen: A is alone
    sched.run_once()
    _measure(sched, {a: solo})
    assert "throughput" in _kinds(sched, a)
    b = _submit(sched, tmp_path, TINY.replace("slots: 1", "slots: 1\noverrides: [seed=5]"))
    sched.run_once()
    pack = [e for e in sched.store.events(b) if e["kind"] == "pack"]
    assert pack and pack[0]["reason"] == "trial packing: pair throughput not measured yet"
    assert ex.launches == [(a, (0,)), (b, (0,))]  # same slot
    _steps(sched.files(b), 1, 1)
    sched.run_once()
    sched.run_once()
    _measure(sched, {a: rate_a, b: rate_b})
    return sched, ex


def test_packed_pair_that_loses_to_time_sharing_is_unpacked_with_measured_reason(
    tmp_path: Path,
) -> None:
    sched, _ = _pack_two(tmp_path, solo=1000.0, rate_a=450.0, rate_b=400.0)
    unpack = [e for e in sched.store.events(2) if e["kind"] == "unpack"]
    assert unpack, _kinds(sched)
    assert unpack[0]["reason"] == "packed throughput 0.45 + 0.40 = 0.85 <= 1: time-share instead"
    measured = [e["message"] for e in sched.store.events(2) if e["kind"] == "throughput"]
    assert "job 2 400 samples/s = 0.40 x 1000 (the solo rate of a job with the same " in measured[0]
    assert sched.state.jobs[2].status is JobStatus.SUSPENDED
    assert sched.store.get_job(2).status == "suspended"
    assert sched.state.jobs[1].status is JobStatus.RUNNING


def test_packed_pair_that_beats_time_sharing_stays_packed(tmp_path: Path) -> None:
    sched, _ = _pack_two(tmp_path, solo=1000.0, rate_a=800.0, rate_b=700.0)
    assert "unpack" not in _kinds(sched)
    assert sched.state.jobs[1].throughput == pytest.approx(0.8)
    assert sched.state.jobs[2].throughput == pytest.approx(0.7)
    assert sched.state.estimate_packed(sched.state.jobs[1], sched.state.jobs[2]) == (
        pytest.approx(0.8),
        pytest.approx(0.7),
    )
    assert sched.state.shared_slots() == [(0, 0)]


def test_preemption_waits_for_the_minimum_run(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, quantum=0.001, packing=False)
    sched.options.min_run_s = 3600.0
    a = _submit(sched, tmp_path)
    sched.run_once()
    b = _submit(sched, tmp_path)
    _tick(sched)
    defer = [e for e in sched.store.events(a) if e["kind"] == "defer"]
    assert defer and defer[0]["message"].endswith(
        "deferred: job 1 is still starting (no training step yet)"
    )
    _steps(sched.files(a), 1, 3)
    _tick(sched)
    sched._wakeup = 0.0  # as if the guard's timer fired
    _tick(sched)
    assert "has trained" in sched.store.events(a)[-1]["message"]
    assert sched.state.jobs[a].status is JobStatus.RUNNING and "suspend" not in _kinds(sched)
    sched.options.min_run_s = 0.0
    sched._wakeup = 0.0
    _tick(sched)
    assert sched.state.jobs[a].status is JobStatus.SUSPENDED
    assert sched.state.jobs[b].status is JobStatus.RUNNING and ex.launches[-1] == (b, (0,))
    suspend = next(e for e in sched.store.events(a) if e["kind"] == "suspend")
    assert suspend["reason"] == "time slice of 0s used; job 2 takes its round-robin turn"


def test_restart_reattaches_live_runs_and_resumes_the_rest(tmp_path: Path) -> None:
    sched, _ex = _scheduler(tmp_path, slots=2, policy="fifo")
    a, b = _submit(sched, tmp_path), _submit(sched, tmp_path)
    sched.run_once()
    pids = {j: sched.store.get_job(j).pid for j in (a, b)}
    assert sched.store.get_job(a).status == sched.store.get_job(b).status == "running"
    # The service dies; job a's process lives on, job b's is gone (no summary).
    new_ex = ScriptedExecutor()
    new_ex.alive = {pids[a]}
    again = Scheduler(
        sched.store, new_ex, build_policy("fifo"), 2, tmp_path, sched.options, clock=sched.clock
    )
    again.recover()
    assert again.state.jobs[a].status is JobStatus.RUNNING
    assert again.state.jobs[a].placement == ((0, 0),) and "reattach" in _kinds(again, a)
    assert again.store.get_job(b).status == "suspended" and "recover" in _kinds(again, b)
    again.run_once()
    assert new_ex.launches == [(b, (1,))] and again.store.get_job(b).runs == 2
    new_ex.alive.clear()  # the re-attached run ends: its summary says complete
    sched.files(a).summary.write_text(json.dumps({"stopped_by_signal": False, "steps": 3}))
    again.run_once()
    assert again.store.get_job(a).status == "completed"


def test_cancel_running_and_waiting_jobs(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, policy="fifo")
    a, b = _submit(sched, tmp_path), _submit(sched, tmp_path)
    sched.run_once()
    _steps(sched.files(a), 1, 4)
    assert sched.cancel(b).status == "cancelled"
    rec = sched.cancel(a)
    assert rec.status == "cancelled" and rec.step == 4 and ex.procs[a].stop_requested
    with pytest.raises(JobConflict, match="job 1 is already cancelled"):
        sched.cancel(a)
    assert sched.state.free_gpus == 1


def test_unrequested_exit_completes_or_fails_the_job(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, slots=2, policy="fifo")
    a, b = _submit(sched, tmp_path), _submit(sched, tmp_path)
    sched.run_once()
    _steps(sched.files(a), 1, 3)
    ex.complete(a)
    sched.files(b).log.write_text("=== distml cluster: run 1 ===\nRuntimeError: no memory\n")
    ex.procs[b].handle["rc"] = 1
    sched.run_once()
    done, failed = sched.store.get_job(a), sched.store.get_job(b)
    assert (done.status, done.step, done.final_loss) == ("completed", 3, pytest.approx(1 / 3))
    assert (failed.status, failed.message) == ("failed", "exit code 1: RuntimeError: no memory")


def test_migrate_moves_a_running_job_through_a_checkpoint(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, slots=2, policy="fifo")
    a = _submit(sched, tmp_path)
    sched.run_once()
    rec = sched.migrate(a, [1])
    assert ex.procs[a].slots == (1,) and rec.placement == [1] and rec.runs == 2
    assert [e["kind"] for e in sched.store.events(a)][-3:] == ["migrate", "stopped", "launch"]
    sched.cancel(a)
    with pytest.raises(JobConflict, match="job 1 is cancelled; only running jobs can migrate"):
        sched.migrate(a, [0])


# ---------------------------------------------------------------- HTTP API
@pytest.fixture
def api(tmp_path: Path) -> Any:
    from fastapi.testclient import TestClient

    from distml.cluster.service.api import create_app

    ex = ScriptedExecutor()
    options = SchedulerOptions(min_run_s=0.0, tick_s=0.02)
    sched = Scheduler(Store(tmp_path / "c.db"), ex, build_policy("fifo"), 2, tmp_path, options)
    sched.start()
    stopped: list[bool] = []
    client = TestClient(create_app(sched, "s3cret", lambda: stopped.append(True)))
    client.headers["Authorization"] = "Bearer s3cret"
    try:
        yield client, sched, stopped
    finally:
        sched.shutdown(timeout=30)


def _post_spec(client: Any, text: str, tmp_path: Path, **extra: Any) -> Any:
    body = {"spec": text, "base_dir": str(tmp_path), "workdir": str(tmp_path), **extra}
    return client.post("/v1/jobs", json=body)


def test_api_rejects_calls_without_the_token(api: Any) -> None:
    client, _, _ = api
    assert client.get("/v1/jobs").status_code == 200
    bare = client.get("/v1/jobs", headers={"Authorization": ""})
    assert bare.status_code == 401
    assert bare.json() == {"error": "missing bearer token; send 'Authorization: Bearer <token>'"}
    wrong = client.post("/v1/shutdown", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("invalid bearer token")
    assert api[2] == []  # the unauthorized shutdown did nothing


def test_api_bad_specs_get_one_line_errors(api: Any, tmp_path: Path) -> None:
    client, _, _ = api
    cases = [
        ("config: [x\n", 400, "job spec is not valid YAML at line 2; fix the syntax"),
        ("slotz: 1\n", 422, f"unknown field 'slotz' in the job spec; valid fields: {VALID}"),
        (
            "slots: 5\n",
            422,
            "job 'job' asks for 5 slots but the cluster has 2; lower slots or start the cluster with --slots 5",
        ),
    ]
    for text, status, message in cases:
        response = _post_spec(client, text, tmp_path)
        assert (response.status_code, response.json()) == (status, {"error": message})
    extra = client.post("/v1/jobs", json={"spec": TINY, "colour": "red"})
    assert extra.status_code == 422
    assert extra.json() == {"error": "unknown field 'colour' in the request"}
    assert client.get("/v1/jobs").json() == []  # nothing was admitted


def test_api_submit_list_logs_events_cancel(api: Any, tmp_path: Path) -> None:
    client, sched, stopped = api
    made = _post_spec(client, TINY.replace("slots: 1", "name: first\nslots: 1"), tmp_path)
    assert made.status_code == 201 and made.json()["name"] == "first"
    job_id = made.json()["id"]
    deadline = time.monotonic() + 20
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sched.files(job_id).log.write_text("hello\nworld\n")
    assert client.get("/v1/jobs/first/logs", params={"tail": 1}).json()["log"] == "world"
    events = client.get("/v1/events", params={"job": "first"}).json()
    start = next(e for e in events if e["kind"] == "start")
    assert start["reason"] == "first in the FIFO queue"
    assert start["message"] == "start job 1 on n0:[0]: first in the FIFO queue"
    assert client.post("/v1/jobs/first/cancel").json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert (again.status_code, again.json()) == (409, {"error": "job 1 is already cancelled"})
    missing = client.get("/v1/jobs/nosuch")
    assert (missing.status_code, missing.json()) == (
        404,
        {"error": "no job named 'nosuch'; see `distml jobs`"},
    )
    assert client.get("/v1/cluster").json()["slots"] == 2
    assert client.post("/v1/shutdown").json() == {"stopping": True} and stopped == [True]


def test_ray_executor_without_ray_is_a_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from distml.cluster.service.executor import build_executor

    real = importlib.util.find_spec

    def without_ray(name: str, *args: Any) -> Any:
        return None if name == "ray" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_ray)  # as if not installed
    with pytest.raises(UserError) as info:
        build_executor("ray")
    assert str(info.value) == (
        "the ray executor needs the 'ray' package, which is not installed; "
        "pip install 'distml[ray]' or use the local executor"
    )
    with pytest.raises(UserError, match="unknown executor 'k8s'; choose local or ray"):
        build_executor("k8s")


def test_elastic_job_grows_into_idle_slots_and_shrinks_for_a_newcomer(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, slots=2, quantum=3600, packing=False)
    elastic = "config: {model: {name: mlp}}\nslots: 1\nelastic: {min: 1, max: 2}\n"
    a = _submit(sched, tmp_path, elastic)
    sched.run_once()
    assert ex.launches == [(a, (0, 1))]  # nothing waits: started on both slots (--nproc 2)
    start = next(e for e in sched.store.events(a) if e["kind"] == "start")
    assert start["reason"] == "elastic start: 1 idle GPU(s) and nothing waiting"
    _steps(sched.files(a), 1, 3)
    _tick(sched)
    b = _submit(sched, tmp_path)
    _tick(sched)
    shrink = next(e for e in sched.store.events(a) if e["kind"] == "shrink")
    assert shrink["reason"] == f"give 1 GPU(s) to waiting job {b}"
    assert ex.procs[a].slots == (0,) and ex.launches[1:] == [(a, (0,)), (b, (1,))]
    assert sched.store.get_job(a).nproc == 1 and sched.store.get_job(a).runs == 2


def test_priority_jumps_the_fifo_queue(tmp_path: Path) -> None:
    sched, ex = _scheduler(tmp_path, policy="fifo")
    first = _submit(sched, tmp_path)
    sched.run_once()
    low = _submit(sched, tmp_path)
    high = sched.submit(_resolve(TINY, tmp_path, 1, priority=5)).id
    sched.run_once()
    ex.complete(first)
    _tick(sched)
    assert [job for job, _ in ex.launches] == [first, high]
    assert sched.store.get_job(low).status == "queued"


def test_shutdown_checkpoints_runs_for_the_next_start(tmp_path: Path) -> None:
    ex = ScriptedExecutor()
    sched = Scheduler(
        Store(tmp_path / "c.db"),
        ex,
        build_policy("fifo"),
        1,
        tmp_path,
        SchedulerOptions(tick_s=0.01),
    )
    sched.start()
    job = _submit(sched, tmp_path)
    deadline = time.monotonic() + 20
    while sched.store.get_job(job).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sched.shutdown(timeout=20)
    rec = sched.store.get_job(job)
    assert ex.procs[job].stop_requested and rec.status == "suspended" and rec.pid is None
    assert rec.message == "checkpointed when the service stopped; resumes at the next start"
    with pytest.raises(JobConflict, match="the scheduler has stopped"):
        sched.submit(_resolve(TINY, tmp_path, 1))


def test_service_refuses_a_busy_port_or_state_dir(tmp_path: Path) -> None:
    import socket

    from distml.cluster.service.server import serve, state_dir_lock

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(UserError) as info:
            serve(tmp_path / "a", slots=1, port=port)
        assert str(info.value) == (
            f"port {port} on 127.0.0.1 is already in use; pick another with --port"
        )
    with state_dir_lock(ServicePaths(tmp_path)), pytest.raises(UserError) as info:
        serve(tmp_path, slots=1, port=port)
    assert str(info.value) == (
        f"another cluster service is using {tmp_path}; stop it with `distml cluster down` "
        "or pick another state dir"
    )
    with pytest.raises(UserError, match="unknown scheduling policy 'sjf'"):
        serve(tmp_path, policy="sjf")
