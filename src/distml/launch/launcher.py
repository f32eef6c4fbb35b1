"""Start the workers of a job with torch.distributed's elastic launcher (the torchrun API).

:func:`launch` runs a module-level function on ``nproc`` local workers per
node through ``torch.distributed.launcher.api.elastic_launch``. Single-node
jobs use a c10d rendezvous on a free loopback port; multi-node jobs with a
fixed node count use the static rendezvous at ``--master ADDR:PORT`` with
``--node-rank``; ``--nnodes MIN:MAX`` uses the elastic c10d rendezvous. When a
worker raises or is killed the agent stops the others and :func:`launch`
raises :class:`~distml.errors.WorkerFailure` naming the rank and its error (or
the worker's :class:`~distml.errors.UserError`, so the CLI can exit 2).
Parameter-server jobs in async or ssp mode are the exception: there a dead
worker rank is logged and dropped while the others go on (the servers drop
it too), and only a server's death stops the job, naming the server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from distml.errors import JobStopped, UserError, WorkerFailure
from distml.runtime.dist import free_port


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
    #: Global ranks whose death is logged and tolerated (the rest go on); derived from a ps
    #: async/ssp job's config when left empty.
    expendable_ranks: frozenset[int] = field(default_factory=frozenset)
    #: Display names of ranks in failure messages, e.g. {2: "parameter server 0"}.
    rank_names: Mapping[int, str] = field(default_factory=dict)

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


def ps_roles(args: Sequence[Any]) -> tuple[frozenset[int], dict[int, str]]:
    """(expendable ranks, rank names) of a parameter-server job from its config argument.

    Ranks ``0..W-1`` are workers and ``W..W+S-1`` servers (see
    ``distml.parallel.ps.strategy``). Workers are expendable in async and ssp
    modes only: sync rounds need every worker.
    """
    for arg in args:
        parallel = arg.get("parallel") if isinstance(arg, Mapping) else None
        if not isinstance(parallel, Mapping) or parallel.get("strategy") != "ps":
            continue
        workers, servers = int(parallel.get("workers", 0)), int(parallel.get("servers", 0))
        names = {workers + i: f"parameter server {i} (rank {workers + i})" for i in range(servers)}
        expendable = parallel.get("consistency") in ("async", "ssp")
        return frozenset(range(workers) if expendable else ()), names
    return frozenset(), {}


def _failure_to_error(exc: Exception, names: Mapping[int, str] | None = None) -> Exception:
    """Turn torch's ChildFailedError into distml's errors with the failing rank named."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return WorkerFailure(str(exc))
    names = names or {}
    server = [r for r in sorted(failures) if r in names]
    rank = server[0] if server else sorted(failures)[0]
    failure = failures[rank]
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
    if rank in names:
        return WorkerFailure(
            f"{names[rank]} died ({detail}); its parameter shard is lost, so the job stops"
            f"{extra}; resume from the last checkpoint with --resume"
        )
    return WorkerFailure(f"worker rank {rank} failed: {detail}{extra}")


def _tolerant_agent_class(expendable: frozenset[int]) -> Any:
    """A LocalElasticAgent that drops dead ``expendable`` ranks instead of stopping the job.

    torch's agent polls its process context, which on the first non-zero exit
    kills every other worker. This one reads the processes' exit codes itself:
    an expendable rank that died is logged once and ignored; any other rank's
    death fails the job as before; the job succeeds once every remaining rank
    has handed back its result.
    """
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    class TolerantAgent(LocalElasticAgent):
        def _monitor_workers(self, worker_group: Any) -> Any:
            pc: Any = self._pcontext
            inner = getattr(pc, "_pc", None)
            if inner is None or not hasattr(pc, "_ret_vals"):
                return super()._monitor_workers(worker_group)  # not a multiprocessing context
            dropped: set[int] = self.__dict__.setdefault("_distml_dropped", set())
            for local, proc in enumerate(inner.processes):
                code = proc.exitcode
                if code in (None, 0) or local in dropped:
                    continue
                rank = worker_group.workers[local].global_rank
                if rank not in expendable:
                    failure = ProcessFailure(local, proc.pid, code, pc.error_files[local])
                    return RunResult(state=WorkerState.FAILED, failures={rank: failure})
                dropped.add(local)
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                print(
                    f"distml: worker rank {rank} died ({how}); dropped, the job goes on with "
                    "the other workers",
                    file=sys.stderr,
                    flush=True,
                )
            mine = {i for i, w in enumerate(worker_group.workers) if w.global_rank in expendable}
            if mine and mine <= dropped:  # no worker left: the job cannot go on
                return RunResult(state=WorkerState.FAILED, failures=self._distml_lost(dropped))
            # Results wait in queues until the agent releases the workers (as torch's poll does).
            for local, queue in pc._ret_vals.items():
                if local not in pc._return_values and not queue.empty():
                    pc._return_values[local] = queue.get()
            remaining = [i for i in range(len(inner.processes)) if i not in dropped]
            if not all(i in pc._return_values for i in remaining):
                return RunResult(state=WorkerState.HEALTHY)
            pc._worker_finished_event.set()
            for i in remaining:
                inner.processes[i].join(timeout=30)
            pc.close()
            values = {worker_group.workers[i].global_rank: pc._return_values[i] for i in remaining}
            # torch's event log wants every rank accounted for: the dropped ones as failures.
            lost = self._distml_lost(dropped)
            return RunResult(state=WorkerState.SUCCEEDED, return_values=values, failures=lost)

        def _distml_lost(self, dropped: set[int]) -> dict[int, Any]:
            pc: Any = self._pcontext
            workers, procs = self._worker_group.workers, pc._pc.processes
            return {
                workers[i].global_rank: ProcessFailure(
                    i, procs[i].pid, procs[i].exitcode, pc.error_files[i]
                )
                for i in sorted(dropped)
            }

    return TolerantAgent


@contextmanager
def _agent_tolerating(expendable: frozenset[int]) -> Iterator[None]:
    """Make torch's launch_agent build the tolerant agent while the block runs."""
    if not expendable:
        yield
        return
    import torch.distributed.launcher.api as launcher_api

    original = launcher_api.LocalElasticAgent
    launcher_api.LocalElasticAgent = _tolerant_agent_class(expendable)  # type: ignore[misc]
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = original  # type: ignore[misc]


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
        endpoint = f"127.0.0.1:{free_port()}"
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
    expendable, names = ps_roles(args)
    expendable = spec.expendable_ranks or expendable
    names = {**names, **spec.rank_names}
    try:
        with _agent_tolerating(expendable):
            results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise _failure_to_error(exc, names) from None
    except SignalException as exc:
        # The agent forwarded the signal to the workers and waited for them to exit.
        if exc.sigval in (signal.SIGTERM, signal.SIGUSR1):
            raise JobStopped(
                f"stopped on {signal.Signals(exc.sigval).name} at a step boundary with a "
                "checkpoint; continue with --resume"
            ) from None
        raise KeyboardInterrupt(str(exc)) from None
    return dict(results or {})
