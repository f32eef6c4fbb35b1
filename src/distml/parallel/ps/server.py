"""The parameter server: one shard, one service thread per worker, three consistency models.

A server owns one :class:`~distml.parallel.ps.shard.Shard`, answers each
worker's pushes with fresh parameters under the configured consistency model
(sync, async or ssp), drops workers whose connection breaks when the model
allows it, and records what it saw for the run summary and for tests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distml.comm.codecs import Codec, Payload, make_codec
from distml.parallel.ps import transport as wire
from distml.parallel.ps.shard import Shard
from distml.parallel.ps.sharding import ShardPlan

log = logging.getLogger("distml.parallel.ps")


def _settled(tensor: torch.Tensor) -> torch.Tensor:
    """Wait for this thread's CUDA stream, so other service threads may read ``tensor``."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
    return tensor


def make_ps_codec(name: str, seed: int) -> Codec:
    return make_codec(name, seed=seed) if name == "int8" else make_codec(name)


@dataclass
class ServerStats:
    """What a server observed: updates applied, workers lost, SSP gaps."""

    updates: int = 0
    dropped: list[int] = field(default_factory=list)
    #: (worker rank, step it pushed (1-based), slowest live worker's completed steps).
    arrivals: list[tuple[int, int, int]] = field(default_factory=list)
    #: (worker rank, steps it completed, slowest live worker's completed steps) at release.
    releases: list[tuple[int, int, int]] = field(default_factory=list)
    busy_s: float = 0.0


class ParameterServer:
    """Serve ``plan``'s shard ``server`` to ``workers`` (global ranks) until all finish.

    Transport: every worker gets a thread that blocks in ``dist.recv`` from that
    worker's rank, so pushes are served in arrival order with no polling. We do not
    use gloo's receive-from-any-source: a broken connection there cannot be pinned
    on one worker, and NCCL has no any-source receive; polling ``is_completed()`` on
    posted receives would burn a core. With one thread per pair, a worker that
    disappears ends only its own thread (gloo raises "connection closed" on that
    pair; the other pairs carry on). Updates happen under one lock:

    * ``sync``: a push waits until every live worker pushed the same round; the last
      arrival averages the gradients in worker order and applies one optimizer step,
      exactly what all-reduce DDP computes.
    * ``async``: each push is applied at once, as ``1/W`` of a global-batch step at
      the LR of the pushing worker's step; the worker pulls the newest shard.
    * ``ssp``: as async, but a worker that completed step ``c`` is released only when
      ``c - slowest <= staleness`` (stale synchronous parallel; 0 is lockstep).

    The reply to a worker's push of ``final_step`` waits until every live worker got
    there, so all workers end on the same model. In async and ssp a lost worker is
    dropped (logged) and the rest continue; in sync the round cannot complete, so
    every waiting worker is answered STOPPED and :meth:`serve` raises. Pulls go whole,
    or with a lossy codec as the change since that worker's copy (tracked here, so
    codec error never accumulates); the first and the last pull always go whole.
    """

    def __init__(
        self,
        plan: ShardPlan,
        server: int,
        workers: Sequence[int],
        shard: Shard,
        lr_at: Callable[[int], list[float]],
        consistency: str = "sync",
        staleness: int = 0,
        codec: str = "none",
        start_step: int = 0,
        final_step: int | None = None,
        comm_device: torch.device | None = None,
    ) -> None:
        self.plan = plan
        self.server = server
        self.workers = list(workers)
        self.shard = shard
        self.lr_at = lr_at
        self.consistency = consistency
        self.staleness = staleness if consistency == "ssp" else 0
        self.codec_name = codec
        self.start_step = start_step
        self.final_step = final_step
        self.device = comm_device or shard.flat.device
        self.push_template = make_ps_codec(codec, 0).encode(torch.zeros_like(shard.flat))
        self._push_decoder = make_ps_codec(codec, 0)
        self.cond = threading.Condition()
        self.live: set[int] = set(self.workers)
        self.clock: dict[int, int] = {w: 0 for w in self.workers}
        self.rounds = 0
        self.pending: dict[int, torch.Tensor] = {}
        self.failure = ""
        self.failed_worker = -1
        self.stats = ServerStats()
        self._errors: list[BaseException] = []

    # ------------------------------------------------------------ the loop
    def serve(self) -> dict[str, Any]:
        """Run until every worker sent DONE or was lost; returns the server's summary."""
        threads = [
            threading.Thread(target=self._guarded, args=(w,), name=f"ps-worker-{w}", daemon=True)
            for w in self.workers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        if self.failure:
            raise wire.PSJobStopped(self.failure)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        gaps = [c - slowest for _, c, slowest in self.stats.releases]
        return {
            "ps_role": "server",
            "ps_server": self.server,
            "ps_shard_bytes": self.plan.server_bytes()[self.server],
            "ps_updates": self.stats.updates,
            "ps_dropped_workers": list(self.stats.dropped),
            "ps_max_gap": max(gaps, default=0),
            "ps_busy_s": self.stats.busy_s,
        }

    def _guarded(self, worker: int) -> None:
        # On CUDA each service thread gets its own stream: a thread blocked in a NCCL recv
        # from its worker must not stall the others' work queued on a shared stream.
        stream = (
            torch.cuda.stream(torch.cuda.Stream(self.device))
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        try:
            with stream:
                self._serve_worker(worker)
        except BaseException as exc:  # surfaced by serve()
            self._errors.append(exc)
            with self.cond:
                self.failure = self.failure or f"server {self.server} failed: {exc}"
                self.cond.notify_all()

    def _serve_worker(self, worker: int) -> None:
        pull_codec = make_ps_codec(self.codec_name, 1000 * self.server + worker)
        replica: torch.Tensor | None = None  # what this worker holds, for delta pulls
        while True:
            try:
                kind, _, _, _ = wire.recv_header(worker, self.device)
                payload = None
                if kind == wire.PUSH:
                    payload = wire.recv_payload(self.push_template, worker, self.device)
            except RuntimeError as exc:
                self._lost(worker, exc)
                return
            if kind == wire.DONE:
                self._leave(worker)
                return
            try:
                if kind == wire.STATE:
                    with self.cond:
                        state = self.shard.export_state()
                    wire.send_tensor_dict(state, worker, self.device)
                    continue
                assert payload is not None, f"unknown message kind {kind} from rank {worker}"
                grad = _settled(self._push_decoder.decode(payload).to(self.shard.flat.device))
                status, snapshot = self._handle_push(worker, grad)
                if status != wire.OK:
                    wire.send_header(
                        [status, 0, len(self.live), self.failed_worker], worker, self.device
                    )
                    return
                # Lossy pulls send the change since this worker's copy; the first pull and the
                # last one go whole, so every worker ends on the exact server model.
                final = self.final_step is not None and (
                    self.start_step + self.clock[worker] >= self.final_step
                )
                if self.codec_name == "none" or replica is None or final:
                    wire.send_header(
                        [wire.OK, self.stats.updates, len(self.live), wire.FULL],
                        worker,
                        self.device,
                    )
                    wire.send_payload(
                        Payload((snapshot,), tuple(snapshot.shape), snapshot.dtype),
                        worker,
                        self.device,
                    )
                    replica = snapshot if self.codec_name != "none" else None
                    continue
                encoded = pull_codec.encode(snapshot - replica)
                replica = replica + pull_codec.decode(encoded).to(replica.device)
                wire.send_header(
                    [wire.OK, self.stats.updates, len(self.live), wire.DELTA], worker, self.device
                )
                wire.send_payload(encoded, worker, self.device)
            except RuntimeError as exc:
                self._lost(worker, exc)
                return

    # ------------------------------------------------------- consistency
    def _slowest(self) -> int:
        live = [self.clock[w] for w in self.live]
        return min(live) if live else 0

    def _handle_push(self, worker: int, grad: torch.Tensor) -> tuple[int, torch.Tensor]:
        with self.cond:
            self.stats.arrivals.append((worker, self.clock[worker] + 1, self._slowest()))
            if self.consistency == "sync":
                return self._sync_push(worker, grad)
            t0 = time.perf_counter()
            step = self.start_step + self.clock[worker]
            self.shard.apply(grad / len(self.workers), self.lr_at(step))
            _settled(self.shard.flat)
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.updates += 1
            self.clock[worker] += 1
            self.cond.notify_all()
            if self.consistency == "ssp":
                self.cond.wait_for(
                    lambda: (
                        bool(self.failure) or self.clock[worker] - self._slowest() <= self.staleness
                    )
                )
            final = self.final_step
            if final is not None and self.start_step + self.clock[worker] >= final:
                # Hold the last reply until everyone is done: all workers end on one model.
                self.cond.wait_for(
                    lambda: (
                        bool(self.failure)
                        or all(self.start_step + self.clock[w] >= final for w in self.live)
                    )
                )
            if self.failure:
                return wire.STOPPED, self.shard.flat
            self.stats.releases.append((worker, self.clock[worker], self._slowest()))
            return wire.OK, self.shard.flat.clone()

    def _sync_push(self, worker: int, grad: torch.Tensor) -> tuple[int, torch.Tensor]:
        round_id = self.rounds
        self.pending[worker] = grad
        self._maybe_finish_round()
        self.cond.wait_for(lambda: bool(self.failure) or self.rounds > round_id)
        if self.failure:
            return wire.STOPPED, self.shard.flat
        self.stats.releases.append((worker, self.clock[worker], self._slowest()))
        return wire.OK, self.shard.flat.clone()

    def _maybe_finish_round(self) -> None:
        """Apply the averaged round once every live worker pushed (call under the lock)."""
        if not self.pending or not self.live.issubset(self.pending):
            return
        t0 = time.perf_counter()
        # Fixed worker order: the sum is the same whoever arrives last.
        total = torch.stack([self.pending[w] for w in sorted(self.pending)]).sum(dim=0)
        self.shard.apply(total / len(self.pending), self.lr_at(self.start_step + self.rounds))
        _settled(self.shard.flat)
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.updates += 1
        for w in self.pending:
            self.clock[w] += 1
        self.pending.clear()
        self.rounds += 1
        self.cond.notify_all()

    # ------------------------------------------------------ membership
    def _leave(self, worker: int) -> None:
        with self.cond:
            self.live.discard(worker)
            if self.consistency == "sync":
                self._maybe_finish_round()
            self.cond.notify_all()

    def _lost(self, worker: int, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with self.cond:
            if worker not in self.live:
                return
            self.live.discard(worker)
            self.stats.dropped.append(worker)
            if self.consistency == "sync":
                self.failed_worker = worker
                self.failure = self.failure or (
                    f"worker rank {worker} was lost ({reason}) and sync mode needs every worker; "
                    "set parallel.consistency=async or ssp to continue without lost workers"
                )
                log.error("parameter server %d: %s", self.server, self.failure)
            else:
                log.warning(
                    "parameter server %d: worker rank %d lost (%s); dropped, continuing with %d "
                    "worker(s)",
                    self.server,
                    worker,
                    reason,
                    len(self.live),
                )
            self.cond.notify_all()
