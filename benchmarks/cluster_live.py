"""Live suspend-to-resume and migration latency of a GPT job through the real scheduler.

Question (issue 7): how long is a slot dead when the scheduler stops a job at a
step boundary and resumes a job from its checkpoint, and where does the time go?
A GPT (6 layers, d_model 384) trains on Tiny Shakespeare as ``distml train``
processes started by the scheduler service (``distml cluster up``) with the
local executor, on CPU slots here.

* migration: one job on 2 slots' service, moved between slot 0 and slot 1
  through the API (``POST /v1/jobs/ID/migrate``), ``--repeats`` times;
* suspend-to-resume: two such jobs on 1 slot under gandiva time-slicing; at each
  switch the running job is suspended and the other resumes from its own
  checkpoint (switches where the resumed job had run before are measured).

Each latency is split at: signal (the scheduler's decision event) -> checkpoint
written (mtime of the checkpoint file) -> process exit (the scheduler's
``stopped`` event) -> restart (``launch`` event) -> first step after resume
(first new line of the job's metrics file, polled every 20 ms here).

    python benchmarks/cluster_live.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, RESULTS_DIR, command_line, machine_info, print_table, write_json
from distml.cluster.service import cli_api
from distml.testing import free_port

DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PHASES = ("checkpoint", "exit", "restart", "first_step")


def _config(steps: int) -> dict[str, Any]:
    return {
        "name": "gpt-live",
        "model": {"name": "gpt", "args": {"n_layer": 6, "n_head": 6, "n_embd": 384}},
        "data": {"name": "text", "path": str(DATA), "seq_len": 64, "global_batch_size": 8},
        "optimizer": {"name": "adamw", "lr": 0.0003},
        "schedule": {"epochs": 1000, "max_steps": steps, "eval_every_epochs": 0},
        "checkpoint": {"every_steps": 0},
    }


class StepWatcher(threading.Thread):
    """Records when each job's metrics file first shows each step (wall time)."""

    def __init__(self, state_dir: Path, jobs: list[int]) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.jobs = state_dir, jobs
        self.first_seen: dict[int, dict[int, float]] = {j: {} for j in jobs}
        self.stop = threading.Event()

    def run(self) -> None:
        offsets = dict.fromkeys(self.jobs, 0)
        while not self.stop.is_set():
            now = time.time()
            for job in self.jobs:
                path = self.state_dir / "jobs" / str(job) / "run" / "metrics.jsonl"
                with contextlib.suppress(OSError):
                    if path.stat().st_size < offsets[job]:
                        offsets[job] = 0  # trimmed by the next run's prepare step
                    with path.open("rb") as fh:
                        fh.seek(offsets[job])
                        chunk = fh.read()
                    complete = chunk[: chunk.rfind(b"\n") + 1]
                    offsets[job] += len(complete)
                    for line in complete.splitlines():
                        with contextlib.suppress(ValueError):
                            record = json.loads(line)
                            if "step" in record and "event" not in record:
                                self.first_seen[job].setdefault(int(record["step"]), now)
            time.sleep(0.02)


def _events(state: Path, kind: str, job: int | None = None) -> list[dict[str, Any]]:
    return [e for e in cli_api.job_events(job, state_dir=state) if e["kind"] == kind]


def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _breakdown(
    state: Path, stopped_job: int, resumed_job: int, signal_t: float, watcher: StepWatcher
) -> dict[str, float]:
    """Phase durations of one stop (of ``stopped_job``) and resume (of ``resumed_job``)."""
    exit_t = min(e["time"] for e in _events(state, "stopped", stopped_job) if e["time"] >= signal_t)
    launch = min(
        (e for e in _events(state, "launch", resumed_job) if e["time"] >= exit_t),
        key=lambda e: e["time"],
    )
    resume_step = int(launch["message"].split("checkpoint at step ")[1].split()[0])
    ckpts = state / "jobs" / str(stopped_job) / "run" / "checkpoints"
    ckpt_t = max(p.stat().st_mtime for p in ckpts.glob("step_*.pt"))
    _wait("the first step after resume", lambda: resume_step + 1 in watcher.first_seen[resumed_job],
          300)  # fmt: skip
    first_t = watcher.first_seen[resumed_job][resume_step + 1]
    return {
        "checkpoint": ckpt_t - signal_t,
        "exit": exit_t - ckpt_t,
        "restart": launch["time"] - exit_t,
        "first_step": first_t - launch["time"],
        "total": first_t - signal_t,
        "resume_step": float(resume_step),
    }


def measure_migration(root: Path, repeats: int) -> list[dict[str, float]]:
    state = root / "migrate"
    spec = root / "job.yaml"
    spec.write_text(json.dumps({"name": "gpt", "config": _config(10**6), "slots": 1}))
    out = []
    try:
        cli_api.cluster_up(2, free_port(), policy="fifo", state_dir=state, tick_s=0.05)
        job = int(cli_api.submit(spec, state_dir=state)["id"])
        watcher = StepWatcher(state, [job])
        watcher.start()
        for i in range(repeats):
            seen = len(watcher.first_seen[job])
            _wait("the job to train", lambda s=seen: len(watcher.first_seen[job]) >= s + 3, 300)
            target = [(i + 1) % 2]
            before = len(_events(state, "migrate", job))
            cli_api.migrate_job(job, target, state_dir=state)
            _wait("the migration", lambda b=before: len(_events(state, "migrate", job)) > b, 120)
            signal_t = _events(state, "migrate", job)[-1]["time"]
            out.append(_breakdown(state, job, job, signal_t, watcher))
            print(f"migration {i + 1}: {out[-1]['total']:.2f} s", flush=True)
        watcher.stop.set()
    finally:
        with contextlib.suppress(Exception):
            cli_api.cluster_down(state_dir=state, force=True, timeout=60)
    return out


def measure_time_slicing(root: Path, repeats: int, quantum: float) -> list[dict[str, float]]:
    state = root / "slice"
    out = []
    try:
        cli_api.cluster_up(
            1, free_port(), policy="gandiva", state_dir=state, tick_s=0.05, min_run_s=quantum,
            policy_options={"quantum": quantum, "packing": False},
        )  # fmt: skip
        jobs = []
        for name in ("a", "b"):
            spec = root / f"{name}.yaml"
            spec.write_text(json.dumps({"name": name, "config": _config(10**6), "slots": 1}))
            jobs.append(int(cli_api.submit(spec, state_dir=state)["id"]))
        watcher = StepWatcher(state, jobs)
        watcher.start()
        measured: set[int] = set()
        deadline = time.monotonic() + 120 + repeats * (quantum + 60) * 2
        while len(out) < repeats:
            if time.monotonic() > deadline:
                raise TimeoutError("not enough time-slice switches")
            for event in _events(state, "suspend"):
                if event["id"] in measured:
                    continue
                stopped = int(event["job_id"])
                other = jobs[1 - jobs.index(stopped)]
                if not _events(state, "stopped", other):
                    measured.add(event["id"])  # the other job's first start, not a resume
                    continue
                launches = [
                    e for e in _events(state, "launch", other) if e["time"] >= event["time"]
                ]
                if not launches:
                    break  # this switch is still under way
                measured.add(event["id"])
                out.append(_breakdown(state, stopped, other, event["time"], watcher))
                print(f"suspend-to-resume {len(out)}: {out[-1]['total']:.2f} s", flush=True)
            time.sleep(0.2)
        watcher.stop.set()
    finally:
        with contextlib.suppress(Exception):
            cli_api.cluster_down(state_dir=state, force=True, timeout=60)
    return out


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in (*PHASES, "total")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantum", type=float, default=8.0, help="gandiva time slice (s)")
    parser.add_argument("--quick", action="store_true", help="1 repeat each")
    parser.add_argument("--out", default=str(RESULTS_DIR / "cluster_live.json"))
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="distml-live-") as tmp:
        root = Path(tmp)
        migration = measure_migration(root, repeats)
        slicing = measure_time_slicing(root, repeats, args.quantum)
    results = {"migration": migration, "suspend_to_resume": slicing}
    medians = {name: _medians(samples) for name, samples in results.items()}
    print_table(
        f"GPT 6x384 on CPU slots, median of {repeats} (seconds)",
        ["latency", "signal->ckpt", "ckpt->exit", "exit->restart", "restart->1st step", "total"],
        [[name, *(f"{m[k]:.2f}" for k in (*PHASES, "total"))] for name, m in medians.items()],
    )
    path = write_json(
        {
            "benchmark": "cluster_live",
            "command": command_line(),
            "machine": machine_info(),
            "model": "gpt n_layer 6, n_head 6, n_embd 384; seq 64, global batch 8",
            "repeats": repeats,
            "quantum_s": args.quantum,
            "medians": medians,
            "samples": results,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
