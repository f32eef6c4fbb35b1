"""What the ``distml cluster`` / ``submit`` / ``jobs`` / ``logs`` / ``cancel`` commands call.

Each function is a few lines over the service's HTTP API, usable from a
notebook as well. The client finds the service through its state dir
(``state_dir`` argument, else ``$DISTML_CLUSTER_DIR``, else
``~/.distml/cluster``): ``service.json`` gives the url and ``token`` the
bearer token. Errors the user can fix -- no service running, a rejected
spec, an unknown job -- raise UserError with the service's one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distml.cluster.service.executor import process_start_id
from distml.cluster.service.server import DEFAULT_HOST, DEFAULT_PORT, ServicePaths
from distml.errors import UserError


def default_state_dir() -> Path:
    env = os.environ.get("DISTML_CLUSTER_DIR")
    return Path(env).expanduser() if env else Path.home() / ".distml" / "cluster"


def _paths(state_dir: str | Path | None) -> ServicePaths:
    root = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
    return ServicePaths(root.resolve())


def _read_info(paths: ServicePaths) -> dict[str, Any] | None:
    try:
        info = json.loads(paths.info.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


class ServiceClient:
    """Authenticated calls to the service of one state dir."""

    def __init__(self, state_dir: str | Path | None = None, timeout: float = 120.0) -> None:
        self.paths = _paths(state_dir)
        info = _read_info(self.paths)
        if info is None:
            raise UserError(
                f"no cluster service is running for {self.paths.root}; start one with "
                "`distml cluster up`"
            )
        self.info = info
        self.url = str(info["url"])
        try:
            self.token = self.paths.token.read_text(encoding="utf-8").strip()
        except OSError:
            raise UserError(f"cannot read the service token {self.paths.token}") from None
        self.timeout = timeout

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            response = httpx.request(
                method, self.url + path, headers=headers, timeout=self.timeout, **kwargs
            )
        except httpx.TransportError:
            raise UserError(
                f"cannot reach the cluster service at {self.url}; is it running? "
                "(`distml cluster up`)"
            ) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text.strip() or f"HTTP {response.status_code}"
            raise UserError(str(message))
        return response.json()


def cluster_up(
    slots: int | None = None,
    port: int = DEFAULT_PORT,
    *,
    host: str = DEFAULT_HOST,
    policy: str = "gandiva",
    policy_options: dict[str, Any] | None = None,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    min_run_s: float | None = None,
    min_run_steps: int | None = None,
    stop_timeout_s: float | None = None,
    tick_s: float | None = None,
    state_dir: str | Path | None = None,
    wait_s: float = 120.0,
) -> dict[str, Any]:
    """Start the service in the background; returns its info (pid, url, slots, state_dir)."""
    paths = _paths(state_dir)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = _read_info(paths)
    if old is not None and process_start_id(int(old["pid"])) is not None:
        raise UserError(
            f"a cluster service is already running at {old['url']} (pid {old['pid']}); "
            "stop it with `distml cluster down`"
        )
    cmd = [
        sys.executable, "-m", "distml.cluster.service",
        "--state-dir", str(paths.root),
        "--host", host,
        "--port", str(port),
        "--policy", policy,
        "--policy-options", json.dumps(policy_options or {}),
        "--executor", executor,
        "--executor-options", json.dumps(executor_options or {}),
    ]  # fmt: skip
    if slots is not None:
        cmd += ["--slots", str(slots)]
    for flag, value in (
        ("--min-run", min_run_s),
        ("--min-run-steps", min_run_steps),
        ("--stop-timeout", stop_timeout_s),
        ("--tick", tick_s),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with paths.log.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(_last_error(paths) or f"the cluster service exited ({proc.returncode})")
        info = _read_info(paths)
        if info is not None and int(info["pid"]) == proc.pid:
            with contextlib.suppress(UserError):
                status = ServiceClient(paths.root).request("GET", "/v1/cluster")
                return {**info, **status, "state_dir": str(paths.root)}
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise UserError(f"the cluster service did not come up within {wait_s:.0f}s; see {paths.log}")


def _last_error(paths: ServicePaths) -> str:
    try:
        lines = paths.log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("distml: error: "):
            return line.removeprefix("distml: error: ")
    return lines[-1] if lines else ""


def submit(
    job_file: str | Path,
    gpus: int | None = None,
    priority: int | None = None,
    *,
    state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Submit the job spec in ``job_file``; ``gpus``/``priority`` override the spec's."""
    path = Path(job_file).expanduser()
    if not path.is_file():
        raise UserError(f"job spec not found: {path}; pass an existing YAML file")
    body = {
        "spec": path.read_text(encoding="utf-8"),
        "base_dir": str(path.resolve().parent),
        "workdir": os.getcwd(),
        "slots": gpus,
        "priority": priority,
    }
    result: dict[str, Any] = ServiceClient(state_dir).request("POST", "/v1/jobs", json=body)
    return result


def list_jobs(*, state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = ServiceClient(state_dir).request("GET", "/v1/jobs")
    return result


def job_info(job: str | int, *, state_dir: str | Path | None = None) -> dict[str, Any]:
    """One job with its allocations (each run's slots, times and outcome)."""
    result: dict[str, Any] = ServiceClient(state_dir).request("GET", f"/v1/jobs/{job}")
    return result


def job_logs(job: str | int, tail: int = 200, *, state_dir: str | Path | None = None) -> str:
    """The last ``tail`` lines of the job's log (every run, each under a header line)."""
    result = ServiceClient(state_dir).request("GET", f"/v1/jobs/{job}/logs", params={"tail": tail})
    return str(result["log"])


def cancel_job(job: str | int, *, state_dir: str | Path | None = None) -> dict[str, Any]:
    result: dict[str, Any] = ServiceClient(state_dir).request("POST", f"/v1/jobs/{job}/cancel")
    return result


def migrate_job(
    job: str | int, slots: list[int] | None = None, *, state_dir: str | Path | None = None
) -> dict[str, Any]:
    """Move a running job to ``slots`` (default: any free ones) via checkpoint and resume."""
    result: dict[str, Any] = ServiceClient(state_dir).request(
        "POST", f"/v1/jobs/{job}/migrate", json={"slots": slots}
    )
    return result


def job_events(
    job: str | int | None = None, since: int = 0, *, state_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Scheduling events (decisions with reasons, launches, stops, measurements), oldest first."""
    params: dict[str, Any] = {"since": since, "limit": 10000}
    if job is not None:
        params["job"] = str(job)
    result: list[dict[str, Any]] = ServiceClient(state_dir).request(
        "GET", "/v1/events", params=params
    )
    return result


def cluster_status(*, state_dir: str | Path | None = None) -> dict[str, Any]:
    result: dict[str, Any] = ServiceClient(state_dir).request("GET", "/v1/cluster")
    return result


def cluster_down(
    *, state_dir: str | Path | None = None, timeout: float = 120.0, force: bool = False
) -> dict[str, Any]:
    """Stop the service; running jobs are checkpointed and resume at the next ``cluster up``.

    ``force`` also kills a service that does not answer and every job process the
    database still lists as running (they resume from their last checkpoints).
    """
    paths = _paths(state_dir)
    info = _read_info(paths)
    pid = int(info["pid"]) if info is not None else None
    if pid is not None and process_start_id(pid) is not None:
        try:
            ServiceClient(paths.root).request("POST", "/v1/shutdown")
        except UserError:
            if not force:
                raise
        deadline = time.monotonic() + timeout
        while process_start_id(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_start_id(pid) is not None:
            if not force:
                raise UserError(
                    f"the cluster service (pid {pid}) did not stop within {timeout:.0f}s; "
                    "run `distml cluster down --force`"
                )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    elif not force:
        raise UserError(f"no cluster service is running for {paths.root}")
    killed = _kill_recorded_runs(paths) if force else []
    return {"stopped": pid is not None, "pid": pid, "killed_jobs": killed}


def _kill_recorded_runs(paths: ServicePaths) -> list[int]:
    from distml.cluster.service.store import Store

    if not paths.db.is_file():
        return []
    store = Store(paths.db)
    killed = []
    try:
        for rec in store.list_jobs(["running"]):
            if rec.pid and rec.pid_start and process_start_id(rec.pid) == rec.pid_start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(rec.pid, signal.SIGKILL)
                killed.append(rec.id)
    finally:
        store.close()
    return killed


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """A plain table of jobs for ``distml jobs``."""
    header = ("ID", "NAME", "STATUS", "SLOTS", "ON", "STEP", "LOSS", "RUNS", "MESSAGE")
    rows = [header]
    for job in jobs:
        loss = job.get("final_loss")
        rows.append(
            (
                str(job["id"]),
                str(job["name"]),
                str(job["status"]),
                str(job["slots"]),
                ",".join(str(s) for s in job.get("placement") or []) or "-",
                "-" if job.get("step") is None else str(job["step"]),
                "-" if loss is None else f"{loss:.4f}",
                str(job.get("runs", 0)),
                str(job.get("message") or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)
