"""The service process: state dir, bearer token, scheduler thread and the uvicorn server.

:func:`serve` runs in the foreground until ``POST /v1/shutdown``, SIGTERM or
Ctrl-C, then checkpoints every running job (they resume at the next start)
and exits. The state dir holds the SQLite database, one folder per job, the
token (mode 0600, new at every start) and ``service.json`` (pid, url), which
clients read; a lock file keeps a second service off the same state dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from distml.cluster.policies import build_policy
from distml.cluster.service.executor import build_executor
from distml.cluster.service.scheduler_loop import Scheduler, SchedulerOptions
from distml.cluster.service.store import Store
from distml.errors import UserError

DEFAULT_PORT = 8470
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServicePaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "cluster.db"

    @property
    def token(self) -> Path:
        return self.root / "token"

    @property
    def info(self) -> Path:
        return self.root / "service.json"

    @property
    def log(self) -> Path:
        return self.root / "service.log"

    @property
    def lock(self) -> Path:
        return self.root / "service.lock"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def new_token(paths: ServicePaths) -> str:
    token = secrets.token_urlsafe(32)
    write_private(paths.token, token + "\n")
    return token


@contextlib.contextmanager
def state_dir_lock(paths: ServicePaths) -> Iterator[None]:
    fh: IO[str] = paths.lock.open("a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(
                f"another cluster service is using {paths.root}; stop it with "
                "`distml cluster down` or pick another state dir"
            ) from None
        yield
    finally:
        fh.close()


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(
                f"port {port} on {host} is already in use; pick another with --port"
            ) from None


def serve(
    state_dir: str | Path,
    *,
    slots: int | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    policy: str = "gandiva",
    policy_options: dict[str, Any] | None = None,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    options: SchedulerOptions | None = None,
) -> None:
    """Run the service in the foreground until shutdown (raises UserError on bad input)."""
    import uvicorn

    from distml.cluster.service.api import create_app

    paths = ServicePaths(Path(state_dir).expanduser().resolve())
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if slots is not None and slots < 1:
        raise UserError(f"--slots {slots} must be >= 1")
    pol = build_policy(policy, **(policy_options or {}))
    with state_dir_lock(paths):
        check_port(host, port)
        runner = build_executor(executor, **(executor_options or {}))
        num_slots = slots or runner.default_slots()
        store = Store(paths.db)
        token = new_token(paths)
        scheduler = Scheduler(store, runner, pol, num_slots, paths.root, options, policy)
        scheduler.start()
        holder: dict[str, uvicorn.Server] = {}

        def request_exit() -> None:
            holder["server"].should_exit = True

        app = create_app(scheduler, token, request_exit)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        holder["server"] = server
        info = {
            "pid": os.getpid(),
            "url": f"http://{host}:{port}",
            "host": host,
            "port": port,
            "slots": num_slots,
            "policy": policy,
            "executor": executor,
            "started": time.time(),
        }
        write_private(paths.info, json.dumps(info))
        try:
            server.run()
        finally:
            scheduler.shutdown()
            paths.info.unlink(missing_ok=True)
            store.close()
