"""The worker side of the parameter server: push gradients, pull parameters.

A :class:`PSClient` flattens this worker's gradients into one buffer per
server (in the plan's chunk order), encodes each with the configured codec
(error feedback keeps what a lossy codec dropped for the next push), sends
all pushes, then receives every server's parameters and writes them back
into the model in place. A broken connection to a server raises
:class:`~distml.parallel.ps.transport.ParameterServerLost`, a STOPPED reply
raises :class:`~distml.parallel.ps.transport.PSJobStopped`: both name the
server and the way out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from distml.comm.codecs import FeedbackEncoder, Payload
from distml.parallel.ps import transport as wire
from distml.parallel.ps.server import make_ps_codec
from distml.parallel.ps.sharding import Chunk, ShardPlan


class PSClient:
    """Talks to every server for one worker; ``params`` are the model's trainable tensors."""

    def __init__(
        self,
        plan: ShardPlan,
        params: Sequence[torch.Tensor],
        server_ranks: Sequence[int],
        codec: str = "none",
        seed: int = 0,
        comm_device: torch.device | None = None,
    ) -> None:
        self.plan = plan
        self.params = list(params)
        self.server_ranks = list(server_ranks)
        self.codec_name = codec
        self.device = comm_device or torch.device("cpu")
        self.chunks: list[list[Chunk]] = [plan.server_chunks(s) for s in range(plan.num_servers)]
        self.encoder = FeedbackEncoder(make_ps_codec(codec, seed), error_feedback=codec != "none")
        self._decoder = make_ps_codec(codec, seed)
        self.templates = [
            make_ps_codec(codec, 0).encode(torch.zeros(sum(c.numel for c in chunks)))
            for chunks in self.chunks
        ]
        self.steps = 0
        self.last_seconds = 0.0
        self.total_seconds = 0.0
        self.bytes_pulled = 0
        self.closed = False

    # ------------------------------------------------------------ helpers
    def _gather(self, server: int) -> torch.Tensor:
        pieces = []
        for chunk in self.chunks[server]:
            p = self.params[chunk.index]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            pieces.append(grad.detach().reshape(-1)[chunk.start : chunk.stop])
        return torch.cat(pieces)

    @torch.no_grad()
    def _scatter(self, server: int, flat: torch.Tensor, delta: bool) -> None:
        offset = 0
        for chunk in self.chunks[server]:
            target = self.params[chunk.index].view(-1)[chunk.start : chunk.stop]
            piece = flat[offset : offset + chunk.numel].to(target.device, target.dtype)
            if delta:
                target.add_(piece)
            else:
                target.copy_(piece)
            offset += chunk.numel

    def _fail(self, server: int, exc: BaseException) -> wire.ParameterServerLost:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return wire.ParameterServerLost(
            f"parameter server {server} (rank {self.server_ranks[server]}) is unreachable "
            f"({reason}); its parameter shard is lost, so the job stops"
        )

    # ------------------------------------------------------------ protocol
    def push_pull(self) -> None:
        """Push this worker's gradients to every server, then pull the new parameters."""
        t0 = time.perf_counter()
        pending = []
        for server, rank in enumerate(self.server_ranks):
            try:
                payload = self.encoder.encode(server, self._gather(server))
                wire.send_header([wire.PUSH, self.steps + 1], rank, self.device)
                for tensor in payload.tensors:
                    wire_tensor = tensor.contiguous().to(self.device)
                    work = dist.isend(wire_tensor, rank)
                    assert work is not None
                    pending.append((server, work, wire_tensor))
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
        for server, rank in enumerate(self.server_ranks):
            try:
                status, _, _, mode = wire.recv_header(rank, self.device)
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
            if status != wire.OK and mode >= 0:
                raise wire.PSJobStopped(
                    f"parameter server {server} stopped the job: worker rank {mode} was lost and "
                    "sync mode needs every worker; use parallel.consistency=async or ssp to "
                    "continue without lost workers"
                )
            if status != wire.OK:
                raise wire.PSJobStopped(
                    f"parameter server {server} (rank {rank}) failed and stopped the job; "
                    "its own error is in its log"
                )
            try:
                if mode == wire.DELTA:
                    payload = wire.recv_payload(self.templates[server], rank, self.device)
                    self._scatter(server, self._decoder.decode(payload), delta=True)
                else:
                    full = torch.empty(self.templates[server].numel, device=self.device)
                    full = full.to(self.params[self.chunks[server][0].index].dtype)
                    dist.recv(full, rank)
                    payload = Payload((full,), tuple(full.shape), full.dtype)
                    self._scatter(server, full, delta=False)
                self.bytes_pulled += payload.nbytes
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
        for server, work, _ in pending:
            try:
                work.wait()
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
        self.steps += 1
        self.last_seconds = time.perf_counter() - t0
        self.total_seconds += self.last_seconds

    def fetch_state(self) -> list[dict[str, torch.Tensor]]:
        """Every server's shard state (parameters and optimizer state), for a checkpoint."""
        out = []
        for server, rank in enumerate(self.server_ranks):
            try:
                wire.send_header([wire.STATE], rank, self.device)
                out.append(wire.recv_tensor_dict(rank, self.device))
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
        return out

    def close(self) -> None:
        """Tell every server this worker is finished (servers stop once all workers have)."""
        if self.closed:
            return
        self.closed = True
        for server, rank in enumerate(self.server_ranks):
            try:
                wire.send_header([wire.DONE], rank, self.device)
            except RuntimeError as exc:
                raise self._fail(server, exc) from None
