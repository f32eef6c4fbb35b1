"""Start the workers of a job with torch.distributed's elastic launcher (the torchrun API).

:func:`launch` runs a module-level function on ``nproc`` local workers per
node through ``torch.distributed.launcher.api.elastic_launch``. Single-node
jobs use a c10d rendezvous on a free loopback port; multi-node jobs with a
fixed node count use the static rendezvous at ``--master ADDR:PORT`` with
``--node-rank``; ``--nnodes MIN:MAX`` uses the elastic c10d rendezvous. When a
worker raises or is killed the agent stops the others and :func:`launch`
raises :class:`~distml.errors.WorkerFailure` naming the rank and its error (or
the worker's :class:`~distml.errors.UserError`, so the CLI can exit 2).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from distml.errors import JobStopped, UserError, WorkerFailure


@dataclass(frozen=True)
class LaunchSpec:
    """Where and how many workers to start."""

    nproc: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    master: str | None = None
    max_restarts: int = 0
    run_id: str = ""
    monitor_interval: float = 0.1

    @property
    def node_range(self) -> tuple[int, int]:
        text = str(self.nnodes)
        try:
            if ":" in text:
                lo, hi = (int(part) for part in text.split(":", 1))
            else:
                lo = hi = int(text)
        except ValueError:
            raise UserError(f"--nnodes {text!r} must be N or MIN:MAX (e.g. 2 or 1:4)") from None
        if lo < 1 or hi < lo:
            raise UserError(f"--nnodes {text!r} must satisfy 1 <= MIN <= MAX")
        return lo, hi

    @property
    def single_process(self) -> bool:
        return self.nproc == 1 and self.node_range == (1, 1)


def parse_master(master: str) -> tuple[str, int]:
    host, sep, port = master.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--master {master!r} must be ADDR:PORT (e.g. 10.0.0.1:29500)")
    return host, int(port)


def check_port_free(host: str, port: int) -> None:
    """Fail early, with the fix, when the rendezvous port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host if host not in ("localhost",) else "127.0.0.1", port))
        except OSError:
            raise UserError(
                f"port {port} on {host} is already in use; pick another with --master {host}:PORT"
            ) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quiet_elastic_logs() -> None:
    # The agent logs every worker failure with a full traceback; distml reports the
    # failing rank and its error in one line instead (tracebacks with --debug).
    level = logging.DEBUG if os.environ.get("DISTML_DEBUG") == "1" else logging.CRITICAL
    # torch gives each elastic module its own logger with an explicit level, so the
    # parents' level is not inherited: set every one that exists (all are imported by now).
    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.")]
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", *names):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(level)


def _failure_to_error(exc: Exception) -> Exception:
    """Turn torch's ChildFailedError into distml's errors with the failing rank named."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return WorkerFailure(str(exc))
    rank, failure = sorted(failures.items())[0]
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    first = text.splitlines()[0] if text else ""
    for prefix in ("ConfigError: ", "UserError: ", "CheckpointError: "):
        if first.startswith(prefix):
            return UserError(first[len(prefix) :])
    if failure.exitcode is not None and failure.exitcode < 0:
        detail = f"killed by signal {-failure.exitcode}"
    else:
        detail = first or f"exit code {failure.exitcode}"
    others = len(failures) - 1
    extra = f" ({others} other rank(s) also stopped)" if others > 0 else ""
    return WorkerFailure(f"worker rank {rank} failed: {detail}{extra}")


def launch(
    entrypoint: Callable[..., Any],
    args: Sequence[Any],
    spec: LaunchSpec,
) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on every worker; return its values by global rank.

    A single-process spec runs in this process (no launcher), which keeps
    notebooks and debuggers simple.
    """
    if spec.single_process:
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }.items():
            os.environ.setdefault(key, value)
        return {0: entrypoint(*args)}

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lo, hi = spec.node_range
    # Every node of one job must present the same run id to the rendezvous; default to
    # one derived from the master endpoint, which all nodes are given.
    run_id = spec.run_id or (f"distml-{spec.master}" if spec.master else uuid.uuid4().hex[:12])
    if hi == 1:
        endpoint = f"127.0.0.1:{_free_port()}"
        backend, rdzv_configs = "static", {"rank": 0}
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    elif lo == hi and spec.node_rank is not None:
        if spec.master is None:
            raise UserError("multi-node launch needs --master ADDR:PORT of node rank 0")
        host, port = parse_master(spec.master)
        if spec.node_rank == 0:
            check_port_free(host, port)
        if not 0 <= spec.node_rank < hi:
            raise UserError(
                f"--node-rank {spec.node_rank} must be in [0, {hi - 1}] for --nnodes {hi}"
            )
        endpoint, backend, rdzv_configs = f"{host}:{port}", "static", {"rank": spec.node_rank}
    else:
        if spec.master is None:
            raise UserError(
                "elastic launch (--nnodes MIN:MAX) needs --master ADDR:PORT for the rendezvous"
            )
        host, port = parse_master(spec.master)
        endpoint, backend, rdzv_configs = f"{host}:{port}", "c10d", {}
    extra: dict[str, Any] = {}
    if "signals_to_handle" in LaunchConfig.__dataclass_fields__:
        # SIGUSR1 (suspend request) is forwarded to the workers like SIGTERM.
        extra["signals_to_handle"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    config = LaunchConfig(
        min_nodes=lo,
        max_nodes=hi,
        nproc_per_node=spec.nproc,
        run_id=run_id,
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=rdzv_configs,
        max_restarts=spec.max_restarts,
        monitor_interval=spec.monitor_interval,
        start_method="spawn",
        **extra,
    )
    _quiet_elastic_logs()
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise _failure_to_error(exc) from None
    except SignalException as exc:
        # The agent forwarded the signal to the workers and waited for them to exit.
        if exc.sigval in (signal.SIGTERM, signal.SIGUSR1):
            raise JobStopped(
                f"stopped on {signal.Signals(exc.sigval).name} at a step boundary with a "
                "checkpoint; continue with --resume"
            ) from None
        raise KeyboardInterrupt(str(exc)) from None
    return dict(results or {})
