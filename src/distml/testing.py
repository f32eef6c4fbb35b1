"""Shared helpers for multi-process tests and benchmarks.

Every multi-process test goes through :func:`run_ranks` (a function on N
ranks joined in one gloo process group) or :func:`run_cli` (a ``distml``
command in its own session). Both pick free ports, enforce a timeout and
always kill and reap every process they started, so a failing or hanging test
never leaves workers or bound ports behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from distml.runtime.dist import free_port


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple[Any, ...],
    env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensor storage by value; the queue's default reducer would
        # share it through a file descriptor that dies with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if backend and dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    ``fn`` must be importable (a module-level function). With ``backend=""`` no
    process group is created (for code that sets up its own). Raises
    :class:`RankFailed` with the first failing rank's traceback, or
    ``TimeoutError``; in every case all processes are killed and joined.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, tuple(args), dict(env or {}), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    collected: dict[int, Any] = {}
    failure: str | None = None
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while len(collected) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)  # let a dying rank's traceback arrive first
                    if results.empty():
                        failure = f"rank {procs.index(dead[0])} exited with code {dead[0].exitcode}"
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_ranks timed out after {timeout:.0f}s") from None
                continue
            if ok:
                collected[rank] = pickle.loads(value)  # from our own child process
            else:
                failure = f"rank {rank} failed:\n{value}"
        if failure is not None:
            raise RankFailed(failure)
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        return [collected[r] for r in range(world_size)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            if proc.pid is not None:  # a failed start() leaves processes never started
                proc.join(timeout=10)
        results.close()
        results.join_thread()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


def run_cli(
    argv: Sequence[str],
    *,
    timeout: float = 180.0,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run ``python -m distml ARGV`` in a new session; kill the whole group on timeout."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", *argv],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(
            f"distml {' '.join(argv)} timed out after {timeout:.0f}s\n{out}\n{err}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # reap any worker left in the session
    return CliResult(proc.returncode, out, err, time.monotonic() - start)
