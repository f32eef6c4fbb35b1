"""The Ray executor: each run is the same ``distml train`` command inside a Ray actor.

The actor reserves the run's slots as Ray resources (GPUs when the Ray cluster
has them, else CPUs), so Ray picks the node and sets ``CUDA_VISIBLE_DEVICES``;
inside it the command runs as a subprocess in its own session, exactly as with
the local executor. Actors are detached and named per job, so a restarted
scheduler re-attaches to them by name and checks the pid and start time. The
state directory (configs, checkpoints, logs) must be on storage that every
Ray node mounts at the same path. ``ray`` is imported only when this executor
is built; without it, building one raises a UserError with the fix.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import subprocess
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

NOT_INSTALLED = (
    "the ray executor needs the 'ray' package, which is not installed; "
    "pip install 'ray[default]' or use the local executor"
)


def _ray() -> Any:
    if importlib.util.find_spec("ray") is None:
        raise UserError(NOT_INSTALLED)
    import ray

    return ray


class _RunActor:
    """Runs one job command on whichever node Ray placed this actor."""

    def __init__(self) -> None:
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, cmd: list[str], cwd: str, log_path: str, header: str) -> tuple[int, str]:
        import os

        from distml.cluster.service.executor import process_start_id

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            log.write(header.encode())
            log.flush()
            self.popen = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
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
        import contextlib
        import os

        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)


class RayExecutor(Executor):
    """Runs on a Ray cluster (``address`` as for ``ray.init``; default: auto-detect)."""

    name = "ray"

    def __init__(self, address: str | None = None, namespace: str = "distml-cluster") -> None:
        ray = _ray()
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = int(resources.get("CPU", 1))
        self._actor_cls = ray.remote(_RunActor)

    def default_slots(self) -> int:
        return self.gpus or self.cpus

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "device": "cuda" if self.gpus else "cpu"}

    @staticmethod
    def _actor_name(job_id: int) -> str:
        return f"distml-job-{job_id}"

    def launch(self, request: LaunchRequest) -> JobProcess:
        k = len(request.slots)
        gpu = self.gpus > 0
        actor = self._actor_cls.options(
            name=self._actor_name(request.job_id),
            lifetime="detached",
            num_gpus=k if gpu else 0,
            num_cpus=0 if gpu else k,
        ).remote()
        files = request.files
        files.job_dir.mkdir(parents=True, exist_ok=True)
        header = f"=== distml cluster: run {request.run} of job {request.job_id} on ray ===\n"
        cmd = train_command(files, k, cpu_threads=not gpu, resume=request.resume)
        pid, start_id = self._ray.get(
            actor.start.remote(cmd, request.workdir, str(files.log), header)
        )
        return JobProcess(request.job_id, pid, start_id, request.slots, files, actor)

    def poll(self, proc: JobProcess) -> Exit | None:
        try:
            rc = self._ray.get(proc.handle.poll.remote(), timeout=30)
        except Exception:  # the actor (or its node) died: the run is over
            return Exit(None)
        if rc is None:
            return None
        self._release(proc)
        return Exit(int(rc))

    def request_stop(self, proc: JobProcess) -> None:
        proc.stop_requested = True
        self._ray.get(proc.handle.signal.remote(int(signal.SIGTERM)), timeout=30)

    def kill(self, proc: JobProcess) -> None:
        try:
            self._ray.get(proc.handle.signal.remote(int(signal.SIGKILL)), timeout=30)
        finally:
            self._release(proc)

    def attach(
        self, job_id: int, pid: int, start_id: str, slots: tuple[int, ...], files: JobFiles
    ) -> JobProcess | None:
        try:
            actor = self._ray.get_actor(self._actor_name(job_id))
            found = self._ray.get(actor.identity.remote(), timeout=30)
        except Exception:  # no such actor: the run ended with the old service
            return None
        if tuple(found) != (pid, start_id):
            return None
        return JobProcess(job_id, pid, start_id, slots, files, actor)

    def _release(self, proc: JobProcess) -> None:
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(proc.handle)
