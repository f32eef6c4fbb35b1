"""Replicas: copies of the model that execute jobs, in a worker process or a thread.

A :class:`ProcessReplica` is a ``spawn``-ed process (one intra-op thread, its
own copy of the model) joined to the server by a duplex pipe that carries
:mod:`~distml.serve.codec` frames, never pickles. A sender thread writes jobs
so the event loop never blocks on a full pipe; a reader thread delivers
results to the pool and turns EOF (the process died, e.g. SIGKILL) into one
``replica_exited`` call. A :class:`ThreadReplica` runs the same loop in a
server thread for ``replicas=0``. Both report to a :class:`ReplicaEvents`.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from distml.errors import UserError
from distml.serve.codec import decode_frame, encode_frame

Frame = tuple[dict[str, Any], list[np.ndarray]]


class ReplicaEvents(Protocol):
    def replica_ready(self, replica: Replica) -> None: ...
    def replica_message(
        self, replica: Replica, message: dict[str, Any], arrays: list[np.ndarray]
    ) -> None: ...
    def replica_exited(self, replica: Replica, reason: str) -> None: ...


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def execute(
    runner: Any,
    message: dict[str, Any],
    arrays: list[np.ndarray],
    send: Callable[[dict[str, Any], list[np.ndarray]], None],
) -> None:
    """Run one job message on ``runner`` and ``send`` its token, result or error frames."""
    job_id = message["id"]

    def emit(extra: dict[str, Any], out: list[np.ndarray]) -> None:
        send({"op": "token", "id": job_id, **extra}, out)

    try:
        meta, out = runner.run(message["kind"], message, arrays, emit)
    except UserError as exc:
        send({"op": "error", "id": job_id, "status": 422, "error": _one_line(exc)}, [])
    except Exception as exc:  # a model failure must answer the job, not kill the replica
        send(
            {
                "op": "error",
                "id": job_id,
                "status": 500,
                "error": f"model failed: {_one_line(exc)}",
            },
            [],
        )
    else:
        send({"op": "result", "id": job_id, **meta}, out)


def _device_for(device: str, index: int) -> str:
    if device == "cuda":
        import torch

        return f"cuda:{index % max(1, torch.cuda.device_count())}"
    return device


def replica_main(conn: Connection, model_path: str, device: str, index: int, threads: int) -> None:
    """Entry point of a replica process: load the model, then serve frames until stop/EOF."""
    # Ctrl-C reaches the whole process group: the server decides when replicas stop (after
    # draining), and a replica whose server died sees EOF on its pipe and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from distml.serve.runner import ModelRunner

    torch.set_num_threads(threads)

    def send(message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        conn.send_bytes(encode_frame(message, arrays))

    try:
        runner = ModelRunner(model_path, _device_for(device, index))
    except Exception as exc:
        send({"op": "fatal", "error": _one_line(exc)}, [])
        return
    gc.freeze()  # keep the loaded model out of full collections (see app.py's lifespan)
    send({"op": "ready", "pid": os.getpid()}, [])
    while True:
        try:
            message, arrays = decode_frame(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server went away
        if message.get("op") == "stop":
            return
        execute(runner, message, arrays, send)


class Replica:
    """State the pool keeps per replica; subclasses move frames."""

    def __init__(self, index: int, events: ReplicaEvents) -> None:
        self.index = index
        self.events = events
        #: starting -> ready -> (draining ->) stopping; the pool owns transitions.
        self.state = "starting"
        self.inflight: dict[int, Any] = {}
        self.pid: int | None = None

    def start(self) -> None:
        raise NotImplementedError

    def send(self, message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def _deliver(self, message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        if message.get("op") == "ready":
            self.pid = message.get("pid")
            self.events.replica_ready(self)
        else:
            self.events.replica_message(self, message, arrays)


class ProcessReplica(Replica):
    def __init__(
        self, index: int, events: ReplicaEvents, model_path: str, device: str, threads: int
    ) -> None:
        super().__init__(index, events)
        self._args = (model_path, device, index, threads)
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._proc: Any = None
        self._conn: Connection | None = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=replica_main,
            args=(child, *self._args),
            daemon=True,
            name=f"distml-replica-{self.index}",
        )
        proc.start()
        self._proc = proc
        # Our copy of the child's end must close, or its death would never read as EOF here.
        child.close()
        self._conn = parent
        self.pid = self._proc.pid
        name = f"replica-{self.index}"
        threading.Thread(target=self._write_loop, name=f"{name}-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name=f"{name}-recv", daemon=True).start()

    def send(self, message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self._outbox.put(encode_frame(message, arrays))

    def _write_loop(self) -> None:
        assert self._conn is not None
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except OSError:
                return  # the reader sees the same death and reports it

    def _read_loop(self) -> None:
        assert self._conn is not None
        reason = "closed its pipe"
        try:
            while True:
                message, arrays = decode_frame(self._conn.recv_bytes())
                if message.get("op") == "fatal":
                    reason = f"failed to load the model: {message.get('error')}"
                self._deliver(message, arrays)
        except (EOFError, OSError):
            pass
        finally:
            self._outbox.put(None)
            self._proc.join(timeout=2.0)
            if self._proc.exitcode is not None and self._proc.exitcode != 0:
                reason = f"exited with code {self._proc.exitcode}"
            with contextlib.suppress(OSError):
                self._conn.close()
            self.events.replica_exited(self, reason)

    def stop(self, timeout: float = 5.0) -> None:
        self._outbox.put(encode_frame({"op": "stop"}))
        if self._proc is None:
            return
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)


class ThreadReplica(Replica):
    """The same job loop in a server thread (``replicas=0``): no copy, no pipe."""

    def __init__(
        self, index: int, events: ReplicaEvents, model_path: str, device: str, threads: int
    ) -> None:
        super().__init__(index, events)
        self._model_path = model_path
        self._device = device
        self._threads = threads
        self._inbox: queue.Queue[Frame | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="replica-thread", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self._inbox.put((message, arrays))

    def _loop(self) -> None:
        import torch

        from distml.serve.runner import ModelRunner

        # OpenMP's thread count is per calling thread: this leaves the server's own alone.
        torch.set_num_threads(self._threads)
        reason = "stopped"
        try:
            runner = ModelRunner(self._model_path, self._device)
        except Exception as exc:
            reason = f"failed to load the model: {_one_line(exc)}"
            self._deliver({"op": "fatal", "error": _one_line(exc)}, [])
            self.events.replica_exited(self, reason)
            return
        self.pid = os.getpid()
        self._deliver({"op": "ready", "pid": self.pid}, [])
        while (item := self._inbox.get()) is not None:
            message, arrays = item
            execute(runner, message, arrays, self._deliver)
        self.events.replica_exited(self, reason)

    def stop(self, timeout: float = 5.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
