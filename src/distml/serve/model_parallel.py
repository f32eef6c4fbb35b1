"""Model-parallel serving: one replica is a gloo process group running a sharded model.

A :class:`GroupReplica` spawns ``tp x pp`` processes joined by
torch.distributed (gloo). Rank 0 talks to the server over the same frame
pipe as a plain replica and runs the job code of
:class:`~distml.serve.runner.ModelRunner`; only its token forward differs:
rank 0 broadcasts a small header and the batch to the group, every rank runs
its part of the forward, and the logits come back to rank 0. Tensor
parallelism uses :func:`~distml.parallel.tensor.apply_tensor_parallel`
(logits all-gathered); pipeline parallelism uses
:func:`~distml.parallel.pipeline.build_pipeline` with GPipe micro-batches, at
one fixed batch shape (torch's pipeline stages size their buffers once), and
the last stage sends the logits to rank 0. While idle, rank 0 broadcasts a
heartbeat so a follower whose leader died stops at the group timeout; the
server watches every rank and kills the whole group when one dies, so the
pool restarts it as one replica.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import threading
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distml.errors import UserError
from distml.runtime.dist import free_port
from distml.serve.codec import decode_frame, encode_frame
from distml.serve.replicas import ProcessReplica, ReplicaEvents, _one_line, execute
from distml.serve.runner import META_KEYS, Emit, ModelRunner

_STOP, _IDLE, _FORWARD = 0, 1, 2
#: Rank 0 broadcasts a heartbeat after this long without a job ...
HEARTBEAT_S = 5.0
#: ... and a collective that waits longer than this fails (a dead leader or peer).
GROUP_TIMEOUT_S = 60.0


class GroupForward:
    """This rank's share of a model-parallel model and the collective forward over it."""

    def __init__(self, model_path: str, tp: int, pp: int, microbatches: int, max_rows: int) -> None:
        from distml.inference.predict import load_for_inference
        from distml.parallel.mesh import build_mesh

        self.rank = dist.get_rank()
        torch.manual_seed(0)  # equal RNG state on all ranks, as tensor parallelism checks
        meta, model = load_for_inference(model_path, torch.device("cpu"))
        self.meta = {k: meta[k] for k in META_KEYS}
        self.task = str(meta["task"])
        _check_plan(model, self.task, tp, pp)
        self.model: nn.Module = model.eval()
        mesh = build_mesh(1, pp, tp)
        if tp > 1:
            from distml.parallel.tensor import apply_tensor_parallel

            apply_tensor_parallel(self.model, mesh, loss_parallel=False)
        self.pipeline: Any = None
        self.pp, self.tp = pp, tp
        if pp > 1:
            from distml.parallel.pipeline import build_pipeline

            # Whole micro-batches only: the fixed batch is the cap rounded up.
            self.rows = -(-max_rows // microbatches) * microbatches
            self.seq = int(self.meta["model_args"]["block_size"])
            self.vocab = int(self.meta["model_args"]["vocab_size"])
            self.pipeline = build_pipeline(
                self.model, mesh, schedule="gpipe", microbatches=microbatches
            )
        dist.barrier()

    # ------------------------------------------------------------ rank 0
    def lead(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rank 0: run ``ids`` (right-padded rows with ``lengths``) on the group; full logits."""
        b, t = ids.shape
        dist.broadcast(torch.tensor([_FORWARD, b, t], dtype=torch.long), src=0)
        dist.broadcast(ids.contiguous(), src=0)
        dist.broadcast(lengths.contiguous(), src=0)
        out = self._forward(ids, lengths)
        assert out is not None
        return out

    def idle(self) -> None:
        dist.broadcast(torch.tensor([_IDLE, 0, 0], dtype=torch.long), src=0)

    def stop(self) -> None:
        dist.broadcast(torch.tensor([_STOP, 0, 0], dtype=torch.long), src=0)

    # ------------------------------------------------------------ other ranks
    def follow(self) -> None:
        """Ranks > 0: take part in every forward rank 0 starts, until it says stop."""
        while True:
            header = torch.zeros(3, dtype=torch.long)
            dist.broadcast(header, src=0)
            op, b, t = (int(v) for v in header)
            if op == _STOP:
                return
            if op == _IDLE:
                continue
            ids = torch.zeros((b, t), dtype=torch.long)
            lengths = torch.zeros(b, dtype=torch.long)
            dist.broadcast(ids, src=0)
            dist.broadcast(lengths, src=0)
            self._forward(ids, lengths)

    # ------------------------------------------------------------ every rank
    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        if self.pipeline is None:
            if self.task == "masked_lm":
                mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
                out: torch.Tensor = self.model(ids, attention_mask=mask.long())
                return out
            logits: torch.Tensor = self.model(ids)
            return logits
        chunks = [
            self._pipeline_chunk(ids[i : i + self.rows]) for i in range(0, len(ids), self.rows)
        ]
        return torch.cat(chunks) if self.rank == 0 else None  # type: ignore[arg-type]

    def _pipeline_chunk(self, ids: torch.Tensor) -> torch.Tensor | None:
        """At most ``rows`` rows through the pipeline at its fixed shape; logits on rank 0."""
        b, t = ids.shape
        # Right padding in both dimensions is harmless under causal attention.
        padded = torch.zeros((self.rows, self.seq), dtype=torch.long)
        padded[:b, :t] = ids
        targets = torch.zeros_like(padded)  # the schedule computes a loss; we ignore it
        _, logits = self.pipeline.evaluate(padded, targets)
        last = (self.pp - 1) * self.tp  # tp rank 0 of the last stage
        if self.rank == last and last != 0:
            dist.send(logits.float().contiguous(), dst=0)
            return None
        if self.rank == 0:
            if last != 0:
                logits = torch.empty((self.rows, self.seq, self.vocab))
                dist.recv(logits, src=last)
            out: torch.Tensor = logits[:b, :t]
            return out
        return None


def _check_plan(model: nn.Module, task: str, tp: int, pp: int) -> None:
    from distml.models.bert import BERT
    from distml.models.gpt import GPT

    if not isinstance(model, GPT | BERT):
        raise UserError(
            f"model-parallel serving supports distml's gpt and bert, not {type(model).__name__} "
            "(quantized models included); serve it with tp=1 and pp=1"
        )
    if pp > 1 and task != "causal_lm":
        raise UserError(
            "pipeline serving supports causal LMs (gpt) only, as padding needs no mask there; "
            "use tp for bert"
        )


class GroupRunner(ModelRunner):
    """Rank 0's job runner: the usual job code over the group's collective forward."""

    def __init__(self, group: GroupForward) -> None:
        self.device = torch.device("cpu")
        self.meta = group.meta
        self.model = group.model
        self.task = group.task
        self.group = group

    def forward_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.group.lead(ids, lengths)

    def run(
        self,
        kind: str,
        message: dict[str, Any],
        arrays: list[np.ndarray],
        emit: Emit | None = None,
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        if kind == "classify":
            raise UserError("model-parallel serving runs token models only")
        return super().run(kind, message, arrays, emit)


def group_main(
    conn: Connection | None,
    model_path: str,
    threads: int,
    rank: int,
    world: int,
    port: int,
    tp: int,
    pp: int,
    microbatches: int,
    max_rows: int,
) -> None:
    """Entry point of one rank of a model-parallel replica."""
    # The server decides when the group stops (after draining), as for plain replicas.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)

    def send(message: dict[str, Any], arrays: list[np.ndarray]) -> None:
        assert conn is not None
        conn.send_bytes(encode_frame(message, arrays))

    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
        )
        group = GroupForward(model_path, tp, pp, microbatches, max_rows)
    except Exception as exc:
        if conn is not None:
            send({"op": "fatal", "error": _one_line(exc)}, [])
        raise SystemExit(1) from None
    try:
        if conn is None:
            group.follow()
            return
        _lead(conn, group, send)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _lead(conn: Connection, group: GroupForward, send: Emit) -> None:
    runner = GroupRunner(group)
    gc.freeze()  # keep the loaded model out of full collections (see app.py's lifespan)
    send({"op": "ready", "pid": os.getpid()}, [])
    while True:
        try:
            if not conn.poll(HEARTBEAT_S):
                group.idle()
                continue
            message, arrays = decode_frame(conn.recv_bytes())
        except (EOFError, OSError):
            message = {"op": "stop"}  # the server went away
        if message.get("op") == "stop":
            group.stop()
            return
        execute(runner, message, arrays, send)


class GroupReplica(ProcessReplica):
    """A replica made of ``tp x pp`` processes; rank 0 holds the pipe to the server."""

    def __init__(
        self,
        index: int,
        events: ReplicaEvents,
        model_path: str,
        threads: int,
        tp: int,
        pp: int,
        microbatches: int,
        max_rows: int,
    ) -> None:
        super().__init__(index, events, model_path, "cpu", threads)
        self._plan = (tp, pp, microbatches, max_rows)
        self._model_path = model_path
        self._threads = threads
        self.group: list[Any] = []
        self._stopping = threading.Event()

    @property
    def group_pids(self) -> list[int]:
        return [p.pid for p in self.group if p.pid is not None]

    def _spawn(self, conn: Connection | None, rank: int, port: int) -> Any:
        ctx = mp.get_context("spawn")
        tp, pp, microbatches, max_rows = self._plan
        args = (conn, self._model_path, self._threads, rank, tp * pp, port, tp, pp)
        proc = ctx.Process(
            target=group_main,
            args=(*args, microbatches, max_rows),
            daemon=True,
            name=f"distml-replica-{self.index}-rank-{rank}",
        )
        proc.start()
        return proc

    def start(self) -> None:
        tp, pp, _, _ = self._plan
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        port = free_port()
        self.group = [self._spawn(child, 0, port)]
        self.group += [self._spawn(None, rank, port) for rank in range(1, tp * pp)]
        child.close()
        self._proc = self.group[0]
        self._conn = parent
        self.pid = self._proc.pid
        name = f"replica-{self.index}"
        threading.Thread(target=self._write_loop, name=f"{name}-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name=f"{name}-recv", daemon=True).start()
        threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True).start()

    def _watch(self) -> None:
        """When one rank exits, the others are blocked in (or will hit) a collective: end them."""
        mpc.wait([p.sentinel for p in self.group])
        # A clean stop ends every rank within moments; a crash leaves peers hanging.
        grace = 10.0 if self._stopping.is_set() else 0.0
        for proc in self.group:
            proc.join(grace)
            if proc.is_alive():
                proc.kill()
            proc.join(5.0)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        super().stop(timeout)
        for proc in self.group:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
