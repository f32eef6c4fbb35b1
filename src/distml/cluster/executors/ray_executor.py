"""The Ray executor: a job's workers are Ray actors placed by one placement group.

Slots are the custom Ray resource ``distml_slot`` (start nodes with
``ray start --resources '{"distml_slot": N}'``, or let this executor start a
local instance with ``local_slots=N``). A run on K slots reserves K bundles of
one slot each (plus one GPU when the Ray cluster has GPUs) in a ``PACK``
placement group, so Ray consolidates the job onto as few nodes as it can. Each
bundle holds one actor that runs one rank of ``distml train`` as a subprocess
in its own session; the ranks join through torch.distributed's ``env://``
rendezvous at a master address and port that the executor picks on rank 0's
node. Every rank appends to the job's log. Suspending sends SIGTERM to every
rank: they agree on a step, rank 0 writes the checkpoint, all exit 0.
Migration is that, then the placement group is released and the next run is
placed afresh. Actors and groups are detached and named per job, so a
restarted scheduler re-attaches by name (pid and start time checked). The
state directory must be on storage every Ray node mounts at the same path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import time
from dataclasses import dataclass
from typing import Any

from distml.cluster.service.executor import (
    Executor,
    Exit,
    JobFiles,
    JobProcess,
    LaunchRequest,
    train_command,
)
from distml.errors import UserError

SLOT = "distml_slot"
NOT_INSTALLED = (
    "the ray executor needs the 'ray' package, which is not installed; "
    "pip install 'distml[ray]' or use the local executor"
)
NO_SLOTS = (
    "the Ray cluster offers no 'distml_slot' resources; start its nodes with "
    "ray start --resources '{\"distml_slot\": N}' or pass local_slots=N"
)
_CALL_TIMEOUT_S = 30.0


def _ray() -> Any:
    if importlib.util.find_spec("ray") is None:
        raise UserError(NOT_INSTALLED)
    import ray

    return ray


class _Worker:
    """One rank of a job, on the node of its placement-group bundle (a Ray actor)."""

    def __init__(self) -> None:
        self.popen: Any = None

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the job's rendezvous."""
        import socket

        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        return ray.util.get_node_ip_address(), port

    def start(
        self, cmd: list[str], cwd: str, env: dict[str, str], log_path: str, header: str
    ) -> tuple[int, str]:
        import os
        import subprocess

        from distml.cluster.service.executor import process_start_id

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        full_env.update(env)
        with open(log_path, "ab") as log:
            log.write(header.encode())
            log.flush()
            self.popen = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.popen.pid, process_start_id(self.popen.pid) or ""

    def identity(self) -> tuple[int, str]:
        from distml.cluster.service.executor import process_start_id

        if self.popen is None:
            return -1, ""
        return self.popen.pid, process_start_id(self.popen.pid) or ""

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, signum: int) -> None:
        import os

        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)


@dataclass
class RayRun:
    """The Ray side of one run: its placement group and one actor per rank."""

    group: Any
    workers: list[Any]
    master: str


def worker_command(
    files: JobFiles, rank: int, *, cpu_threads: bool, resume: Any = None
) -> list[str]:
    """``distml train`` for one rank; only rank 0 writes the run summary."""
    cmd = train_command(files, 1, cpu_threads=cpu_threads, resume=resume)
    if rank > 0:
        at = cmd.index("--summary-json")
        del cmd[at : at + 2]
    return cmd


def rank_env(rank: int, world_size: int, addr: str, port: int) -> dict[str, str]:
    """The torch.distributed environment of one rank (what torchrun would set)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0",  # one rank per actor; Ray gives each its own GPU
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }


class RayExecutor(Executor):
    """Runs jobs on a Ray cluster (``address`` as for ``ray.init``; default: a running one).

    ``local_slots=N`` starts a private local Ray instance with N slots instead,
    which is how a single machine (and the tests) use it.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "distml-cluster",
        local_slots: int | None = None,
        place_timeout_s: float = 60.0,
    ) -> None:
        ray = _ray()
        self._ray = ray
        if not ray.is_initialized():
            if local_slots is not None:
                ray.init(
                    address="local",
                    namespace=namespace,
                    resources={SLOT: float(local_slots)},
                    include_dashboard=False,
                    log_to_driver=False,
                )
            else:
                try:
                    ray.init(address=address or "auto", namespace=namespace, log_to_driver=False)
                except (ConnectionError, SystemExit):  # ray exits when the GCS never answers
                    raise UserError(
                        f"no Ray cluster found at {address or 'auto'}; start one with ray start "
                        "--head --resources '{\"distml_slot\": N}' or pass --ray-address"
                    ) from None
        resources = ray.cluster_resources()
        self.slots = int(resources.get(SLOT, 0))
        if self.slots < 1:
            raise UserError(NO_SLOTS)
        self.gpus = int(resources.get("GPU", 0))
        self.place_timeout_s = place_timeout_s
        self._worker_cls = ray.remote(_Worker)

    def default_slots(self) -> int:
        return self.slots

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "device": "cuda" if self.gpus else "cpu"}

    @staticmethod
    def _group_name(job_id: int) -> str:
        return f"distml-job-{job_id}"

    @staticmethod
    def _worker_name(job_id: int, rank: int) -> str:
        return f"distml-job-{job_id}-rank-{rank}"

    def _bundle(self) -> dict[str, float]:
        return {SLOT: 1.0, "GPU": 1.0} if self.gpus else {SLOT: 1.0}

    def launch(self, request: LaunchRequest) -> JobProcess:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        k = len(request.slots)
        self._clear_leftovers(request.job_id, k)
        group = placement_group(
            [self._bundle() for _ in range(k)],
            strategy="PACK",
            name=self._group_name(request.job_id),
            lifetime="detached",
        )
        try:
            self._ray.get(group.ready(), timeout=self.place_timeout_s)
        except Exception:
            self._remove_group(group)
            raise UserError(
                f"Ray could not place job {request.job_id} on {k} distml_slot(s) within "
                f"{self.place_timeout_s:.0f} s; add Ray nodes with slots or ask for fewer"
            ) from None
        workers = [
            self._worker_cls.options(
                name=self._worker_name(request.job_id, rank),
                lifetime="detached",
                num_cpus=0,
                num_gpus=1 if self.gpus else 0,
                resources={SLOT: 1.0},
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank
                ),
            ).remote()
            for rank in range(k)
        ]
        run = RayRun(group, workers, "")
        try:
            addr, port = self._ray.get(workers[0].endpoint.remote(), timeout=_CALL_TIMEOUT_S)
            run.master = f"{addr}:{port}"
            files = request.files
            files.job_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            starts = [
                w.start.remote(
                    worker_command(files, rank, cpu_threads=not self.gpus, resume=request.resume),
                    request.workdir,
                    rank_env(rank, k, addr, port),
                    str(files.log),
                    f"=== distml cluster: run {request.run} of job {request.job_id}, rank "
                    f"{rank}/{k} on ray (master {run.master}) at {stamp} ===\n",
                )
                for rank, w in enumerate(workers)
            ]
            idents = self._ray.get(starts, timeout=_CALL_TIMEOUT_S)
        except Exception:
            self._release(run)
            raise
        pid, start_id = idents[0]
        extra = {"master": run.master, "pids": [p for p, _ in idents]}
        return JobProcess(request.job_id, pid, start_id, request.slots, files, run, extra=extra)

    def poll(self, proc: JobProcess) -> Exit | None:
        run: RayRun = proc.handle
        try:
            codes = self._ray.get([w.poll.remote() for w in run.workers], timeout=_CALL_TIMEOUT_S)
        except Exception:  # an actor (or its node) died: the run is over
            self._signal_all(run, signal.SIGKILL)
            self._release(run)
            return Exit(None)
        failed = [c for c in codes if c not in (None, 0)]
        if None in codes:
            if failed:
                # A dead rank leaves its peers blocked in a collective: end the run now.
                self._signal_all(run, signal.SIGKILL)
            return None
        self._release(run)
        return Exit(int(failed[0]) if failed else 0)

    def request_stop(self, proc: JobProcess) -> None:
        proc.stop_requested = True
        self._signal_all(proc.handle, signal.SIGTERM)

    def kill(self, proc: JobProcess) -> None:
        try:
            self._signal_all(proc.handle, signal.SIGKILL)
        finally:
            self._release(proc.handle)

    def attach(
        self, job_id: int, pid: int, start_id: str, slots: tuple[int, ...], files: JobFiles
    ) -> JobProcess | None:
        from ray.util import get_placement_group

        try:
            workers = [self._ray.get_actor(self._worker_name(job_id, r)) for r in range(len(slots))]
            found = self._ray.get(workers[0].identity.remote(), timeout=_CALL_TIMEOUT_S)
            group = get_placement_group(self._group_name(job_id))
        except Exception:  # no such actors: the run ended with the old service
            return None
        if tuple(found) != (pid, start_id):
            return None
        return JobProcess(job_id, pid, start_id, slots, files, RayRun(group, workers, ""))

    def _signal_all(self, run: RayRun, sig: signal.Signals) -> None:
        calls = [w.signal.remote(int(sig)) for w in run.workers]
        with contextlib.suppress(Exception):  # a dead actor has nothing left to signal
            self._ray.get(calls, timeout=_CALL_TIMEOUT_S)

    def _release(self, run: RayRun) -> None:
        for worker in run.workers:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(worker)
        self._remove_group(run.group)

    def _remove_group(self, group: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):  # already removed
            remove_placement_group(group)

    def _clear_leftovers(self, job_id: int, k: int) -> None:
        # An earlier service may have died between a run's end and its release.
        from ray.util import get_placement_group

        for rank in range(max(k, 64)):
            try:
                actor = self._ray.get_actor(self._worker_name(job_id, rank))
            except ValueError:
                if rank >= k:
                    break
                continue
            with contextlib.suppress(Exception):
                self._ray.get(actor.signal.remote(int(signal.SIGKILL)), timeout=_CALL_TIMEOUT_S)
            with contextlib.suppress(Exception):
                self._ray.kill(actor)
        with contextlib.suppress(Exception):
            self._remove_group(get_placement_group(self._group_name(job_id)))
