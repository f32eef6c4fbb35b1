"""How the service runs a job: the executor interface and what every executor shares.

A job run is one ``distml train CONFIG --resume CKPT --nproc K`` process in its own
session; the mechanism behind every scheduling decision is distml's elastic
training. Suspending sends SIGTERM to the process group: the job finishes its
step, writes a checkpoint and exits 0. Resuming, migrating and resizing are a
new run with ``--resume`` on other slots or another ``--nproc``, which
continues from the checkpoint with the same global batch. Before each
run the per-step metrics file is trimmed to the checkpoint it resumes from, so
a job killed between checkpoints still logs every step exactly once.

An :class:`Executor` only starts, signals and watches processes; the
scheduler decides. ``local`` (subprocesses on this machine) is the default,
``ray`` runs the same command on a Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from distml.errors import UserError

_CKPT = re.compile(r"^step_(\d{8})\.pt$")
STOP_MESSAGE = "stopped on SIG"  # both the trainer's and the launcher's stop lines contain it


@dataclass(frozen=True)
class JobFiles:
    """Where one job keeps its config snapshot, run directory, log and summary."""

    job_dir: Path

    @property
    def config(self) -> Path:
        return self.job_dir / "config.yaml"

    @property
    def run_dir(self) -> Path:
        return self.job_dir / "run"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def superseded(self) -> Path:
        """Checkpoints ahead of the metrics, set aside by :func:`prepare_run`."""
        return self.run_dir / "superseded"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.job_dir / "job.log"

    @property
    def summary(self) -> Path:
        return self.job_dir / "summary.json"


@dataclass(frozen=True)
class LaunchRequest:
    job_id: int
    files: JobFiles
    workdir: str
    slots: tuple[int, ...]
    run: int  # 1 for the first run of the job, then 2, 3, ...
    resume: Path | None = None  # the checkpoint to continue from (None: step 0)


@dataclass
class JobProcess:
    """A live run of a job: its process (group leader) and where it runs."""

    job_id: int
    pid: int
    start_id: str  # the process's start time: tells our pid from a recycled one
    slots: tuple[int, ...]
    files: JobFiles
    handle: Any = None  # executor-specific: a Popen, a Ray actor, or None when re-attached
    stop_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nproc(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class Exit:
    """A finished run; ``returncode`` is None for a re-attached process we cannot wait on."""

    returncode: int | None


class Executor(ABC):
    """Starts, stops and watches job processes on numbered slots."""

    name: ClassVar[str] = "executor"

    @abstractmethod
    def launch(self, request: LaunchRequest) -> JobProcess:
        """Start ``distml train`` for the job on ``request.slots`` (one worker per slot)."""

    @abstractmethod
    def poll(self, proc: JobProcess) -> Exit | None:
        """None while the run is alive, else how it ended."""

    @abstractmethod
    def request_stop(self, proc: JobProcess) -> None:
        """Ask the run to checkpoint at the next step boundary and exit (SIGTERM)."""

    @abstractmethod
    def kill(self, proc: JobProcess) -> None:
        """Kill the run and every process it started, now."""

    @abstractmethod
    def attach(
        self, job_id: int, pid: int, start_id: str, slots: tuple[int, ...], files: JobFiles
    ) -> JobProcess | None:
        """Re-attach to a run started by an earlier service, if it is still that process."""

    def default_slots(self) -> int:
        return max(1, os.cpu_count() or 1)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}


def train_command(
    files: JobFiles, nproc: int, *, cpu_threads: bool, resume: Path | None = None
) -> list[str]:
    """The ``distml train`` command of one run, resuming from ``resume`` if given."""
    cmd = [
        sys.executable,
        "-m",
        "distml",
        "train",
        str(files.config),
        f"logging.run_dir={files.run_dir}",
        f"checkpoint.dir={files.checkpoints}",
        "logging.progress=false",
    ]
    if cpu_threads:
        cmd.append("parallel.threads_per_worker=1")
    if resume is not None:
        cmd += ["--resume", str(resume)]
    cmd += ["--nproc", str(nproc), "--no-progress", "--summary-json", str(files.summary)]
    return cmd


def checkpoint_steps(files: JobFiles) -> dict[int, Path]:
    """The job's ``step_*.pt`` checkpoints by step."""
    if not files.checkpoints.is_dir():
        return {}
    found = {}
    for path in files.checkpoints.iterdir():
        match = _CKPT.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def latest_checkpoint_step(files: JobFiles) -> int:
    """Step of the newest checkpoint (0 if none)."""
    return max(checkpoint_steps(files), default=0)


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            out.append((line, record))
    return out


def prepare_run(files: JobFiles) -> tuple[int, Path | None]:
    """Pick the checkpoint the next run resumes from and trim the metrics to it.

    That is the newest checkpoint whose steps are all in ``metrics.jsonl``: a run
    killed outright (not stopped) may have saved a checkpoint while its last metric
    lines were still buffered, and resuming there would leave a gap. Newer
    checkpoints move to ``run/superseded``; lines past the resume step go, so the
    next run logs every step exactly once. Returns (step, path), or (0, None) to
    start over.
    """
    files.summary.unlink(missing_ok=True)
    records = _read_records(files.metrics) if files.metrics.is_file() else []
    logged = max((int(r["step"]) for _, r in records if "event" not in r), default=0)
    steps = checkpoint_steps(files)
    step = max((s for s in steps if s <= logged), default=0)
    for newer in sorted(s for s in steps if s > step):
        files.superseded.mkdir(parents=True, exist_ok=True)
        os.replace(steps[newer], files.superseded / steps[newer].name)
    if step == 0:
        files.metrics.unlink(missing_ok=True)
        return 0, None
    kept = "".join(f"{line}\n" for line, r in records if int(r.get("step", 0)) <= step)
    tmp = files.metrics.with_suffix(".tmp")
    tmp.write_text(kept, encoding="utf-8")
    os.replace(tmp, files.metrics)
    return step, steps[step]


def read_summary(files: JobFiles) -> dict[str, Any] | None:
    try:
        data = json.loads(files.summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def log_tail(files: JobFiles, lines: int = 200) -> str:
    """The last ``lines`` lines of the job's log (all runs)."""
    try:
        with files.log.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def classify_exit(proc: JobProcess, exit: Exit) -> tuple[str, str]:
    """('completed' | 'stopped' | 'failed', one-line detail) for a finished run."""
    summary = read_summary(proc.files)
    if summary is not None:
        if summary.get("stopped_by_signal"):
            return "stopped", f"checkpointed at step {summary.get('steps')}"
        return "completed", f"finished {summary.get('steps')} steps"
    rc = exit.returncode
    last_run = log_tail(proc.files, 40).split("=== distml cluster:")[-1]
    if STOP_MESSAGE in last_run or rc == 0:
        return "stopped", "stopped at a step boundary with a checkpoint"
    if proc.stop_requested:
        # Stopped before its signal handler was installed (still starting) or killed
        # after the stop timeout: it resumes from the checkpoint it had.
        return "stopped", f"stopped during start-up or by force (exit code {rc})"
    lines = [ln for ln in last_run.splitlines() if ln.strip()]
    detail = lines[-1].strip() if lines else "no output"
    if rc is None:
        return "failed", f"exited while the service was away, without a summary: {detail}"
    return "failed", f"exit code {rc}: {detail}"


def process_start_id(pid: int) -> str | None:
    """A token for the start time of live process ``pid`` (None if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return _ps_start_id(pid)
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of stat: start time in clock ticks since boot


def _ps_start_id(pid: int) -> str | None:
    # Systems without /proc (macOS): ps prints the start time and state.
    try:
        out = subprocess.run(
            ["ps", "-o", "stat=,lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else out


def build_executor(name: str, **options: Any) -> Executor:
    """``local`` (default) or ``ray``; a UserError names the choices."""
    if name == "local":
        from distml.cluster.executors.local import LocalExecutor

        return LocalExecutor(**options)
    if name == "ray":
        from distml.cluster.executors.ray_executor import RayExecutor

        return RayExecutor(**options)
    raise UserError(f"unknown executor {name!r}; choose local or ray")
