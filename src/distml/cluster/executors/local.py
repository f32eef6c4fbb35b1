"""The local executor: each run is a ``distml train`` subprocess in its own session.

Slots are GPUs when this machine has CUDA devices (a run sees its slots through
``CUDA_VISIBLE_DEVICES``) and CPU cores otherwise: a run on K slots starts K
single-threaded workers pinned to those cores, so two jobs packed on one slot
really share one core and measured throughputs mean something. Output of every
run is appended to the job's log. Stopping signals the whole process group, so
the elastic launcher's workers are reached too; a run left over by an earlier
service is re-attached by pid after checking its start time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from typing import Any, Literal

from distml.cluster.service.executor import (
    Executor,
    Exit,
    JobFiles,
    JobProcess,
    LaunchRequest,
    process_start_id,
    train_command,
)
from distml.errors import UserError


def cuda_device_count() -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 without a driver); avoids importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class LocalExecutor(Executor):
    """Subprocesses on this machine; ``device`` auto picks CUDA when GPUs are present."""

    name = "local"

    def __init__(self, device: Literal["auto", "cpu", "cuda"] = "auto", pin_cpus: bool = True):
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"local executor device {device!r} must be auto, cpu or cuda")
        gpus = cuda_device_count() if device != "cpu" else 0
        if device == "cuda" and gpus == 0:
            raise UserError("device cuda asked for, but no GPU is visible; use --device cpu")
        self.gpus = gpus
        self.device = "cuda" if gpus else "cpu"
        self.pin_cpus = pin_cpus and hasattr(os, "sched_setaffinity")
        self._cpus = _allowed_cpus()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._gpu_ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None

    def default_slots(self) -> int:
        return self.gpus or len(self._cpus)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "device": self.device, "pin_cpus": self.pin_cpus}

    def launch(self, request: LaunchRequest) -> JobProcess:
        files = request.files
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        cpu = self.device == "cpu"
        if not cpu:
            ids = [self._gpu_id(s) for s in request.slots]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        cmd = train_command(files, len(request.slots), cpu_threads=cpu, resume=request.resume)
        files.job_dir.mkdir(parents=True, exist_ok=True)
        with files.log.open("ab") as log:
            header = (
                f"=== distml cluster: run {request.run} of job {request.job_id} on slots "
                f"{list(request.slots)} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n"
            )
            log.write(header.encode())
            log.flush()
            popen = subprocess.Popen(
                cmd,
                cwd=request.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if cpu and self.pin_cpus:
            cores = {self._cpus[s % len(self._cpus)] for s in request.slots}
            # Set right after the spawn: torch's threads and the launcher's workers are
            # created seconds later and inherit the mask.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(popen.pid, cores)
        start_id = process_start_id(popen.pid) or ""
        return JobProcess(request.job_id, popen.pid, start_id, request.slots, files, popen)

    def _gpu_id(self, slot: int) -> str:
        if self._gpu_ids is not None:
            return self._gpu_ids[slot % len(self._gpu_ids)]
        return str(slot % max(1, self.gpus))

    def poll(self, proc: JobProcess) -> Exit | None:
        if isinstance(proc.handle, subprocess.Popen):
            rc = proc.handle.poll()
            if rc is None:
                return None
            self._reap_group(proc)
            return Exit(rc)
        if process_start_id(proc.pid) == proc.start_id:
            return None
        return Exit(None)

    def request_stop(self, proc: JobProcess) -> None:
        proc.stop_requested = True
        self._signal(proc, signal.SIGTERM)

    def kill(self, proc: JobProcess) -> None:
        self._signal(proc, signal.SIGKILL)
        if isinstance(proc.handle, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.handle.wait(timeout=10)

    def attach(
        self, job_id: int, pid: int, start_id: str, slots: tuple[int, ...], files: JobFiles
    ) -> JobProcess | None:
        if not start_id or process_start_id(pid) != start_id:
            return None
        return JobProcess(job_id, pid, start_id, slots, files, None)

    def _signal(self, proc: JobProcess, sig: signal.Signals) -> None:
        alive = (
            proc.handle.poll() is None
            if isinstance(proc.handle, subprocess.Popen)
            else process_start_id(proc.pid) == proc.start_id
        )
        if not alive:
            return
        try:
            os.killpg(proc.pid, sig)  # the run leads its own session: pgid == pid
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(proc.pid, sig)

    @staticmethod
    def _reap_group(proc: JobProcess) -> None:
        # Workers orphaned by a crashed launcher would hold the slot: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
