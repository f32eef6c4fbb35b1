"""DDP communication hooks that compress gradients, selectable by name.

``make_compression_hook(name)`` returns ``(state, hook)`` for
``ddp_model.register_comm_hook(state, hook)``. "none", "fp16" and "bf16"
all-reduce (the half-precision ones in 16 bits, divided by the world size
first so the sum cannot overflow). "int8" and "topk" payloads are not
summable, so ranks all-gather them, decode and average locally, optionally
with error feedback. "powersgd" sends a rank-r factorisation of each gradient
matrix (warm-started, with error feedback). Every state counts bytes so the
run summary can report the compression ratio, and checkpoints its residuals
through ``state_dict`` / ``load_state_dict`` (plain tensors, ints and lists).

This module deliberately does not use ``from __future__ import annotations``:
DDP inspects the hook's annotations at registration and rejects strings.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from distml.comm.codecs import Codec, ErrorFeedback, Int8Codec, Payload, TopKCodec
from distml.errors import ConfigError

__all__ = [
    "HOOK_NAMES",
    "AllReduceState",
    "CompressionState",
    "GatherState",
    "PowerSGDState",
    "allreduce_hook",
    "gather_hook",
    "make_compression_hook",
    "powersgd_hook",
]

#: Names accepted by :func:`make_compression_hook`.
HOOK_NAMES = ("none", "fp16", "bf16", "int8", "topk", "powersgd")

Future = torch.futures.Future
_Layout = tuple[tuple[int, ...] | None, tuple[tuple[int, ...], ...]]


class CompressionState:
    """What every hook state has: the group, byte counters and per-bucket layouts.

    Per-bucket state (residuals, PowerSGD factors) is keyed by bucket index.
    DDP rebuilds its buckets after the first iteration, so a bucket index can
    name different parameters later; when a bucket's parameters change, its
    state is dropped rather than applied to the wrong gradients.
    """

    def __init__(self, name: str, process_group: dist.ProcessGroup | None = None) -> None:
        self.name = name
        self.process_group = process_group
        self.bytes_uncompressed = 0
        self.bytes_sent = 0
        self._layouts: dict[int, _Layout] = {}

    @property
    def compression_ratio(self) -> float:
        """Uncompressed bytes over bytes this rank sent (1.0 before the first step)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def summary(self) -> dict[str, Any]:
        return {
            "compression": self.name,
            "bytes_uncompressed": self.bytes_uncompressed,
            "bytes_sent": self.bytes_sent,
            "compression_ratio": self.compression_ratio,
        }

    def _count(self, bucket: torch.Tensor, sent_bytes: int) -> None:
        self.bytes_uncompressed += bucket.numel() * bucket.element_size()
        self.bytes_sent += sent_bytes

    def _bucket_index(self, bucket: dist.GradBucket) -> int:
        index = bucket.index()
        params = bucket.parameters()
        ptrs = tuple(p.data_ptr() for p in params)
        shapes = tuple(tuple(p.shape) for p in params)
        known = self._layouts.get(index)
        if known is not None and (known[1] != shapes or known[0] not in (None, ptrs)):
            self._forget(index)
        self._layouts[index] = (ptrs, shapes)
        return index

    def _forget(self, index: int) -> None:
        """Drop per-bucket state that no longer matches the bucket's parameters."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes_uncompressed": self.bytes_uncompressed,
            "bytes_sent": self.bytes_sent,
            # Parameter shapes only: data pointers mean nothing in another process.
            "layouts": {i: [list(s) for s in lay[1]] for i, lay in self._layouts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ConfigError(
                f"compression state was saved for {state['name']!r} but the run uses "
                f"{self.name!r}; resume with the same compression or start fresh"
            )
        self.bytes_uncompressed = int(state["bytes_uncompressed"])
        self.bytes_sent = int(state["bytes_sent"])
        self._layouts = {
            int(i): (None, tuple(tuple(s) for s in shapes))
            for i, shapes in state.get("layouts", {}).items()
        }


class AllReduceState(CompressionState):
    """State of "none", "fp16" and "bf16": the dtype the all-reduce runs in."""

    def __init__(
        self, name: str, process_group: dist.ProcessGroup | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__(name, process_group)
        self.dtype = dtype


def allreduce_hook(state: AllReduceState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """Average the bucket with one all-reduce, optionally in 16-bit floats."""
    buffer = bucket.buffer()
    world = state.world_size()
    # Dividing before the sum matches DDP's own reducer bit for bit and keeps
    # half-precision sums in range.
    if state.dtype is None or state.dtype == buffer.dtype:
        tensor = buffer.div_(world)
    else:
        tensor = buffer.div(world).to(state.dtype)
    state._count(buffer, tensor.numel() * tensor.element_size())
    fut = dist.all_reduce(tensor, group=state.process_group, async_op=True).get_future()

    def finish(done: Future[list[torch.Tensor]]) -> torch.Tensor:
        result = done.value()[0]
        return result if result is buffer else buffer.copy_(result)

    return fut.then(finish)


class GatherState(CompressionState):
    """State of "int8" and "topk": the codec and, optionally, per-bucket residuals."""

    def __init__(
        self,
        name: str,
        process_group: dist.ProcessGroup | None,
        codec: Codec,
        error_feedback: bool,
    ) -> None:
        super().__init__(name, process_group)
        self.codec = codec
        self.feedback = ErrorFeedback() if error_feedback else None

    def _forget(self, index: int) -> None:
        if self.feedback is not None:
            self.feedback.reset(index)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["codec"] = self.codec.state_dict()
        if self.feedback is not None:
            state["feedback"] = self.feedback.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.codec.load_state_dict(state.get("codec", {}))
        if self.feedback is not None and "feedback" in state:
            self.feedback.load_state_dict(state["feedback"])


def gather_hook(state: GatherState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """All-gather every rank's encoded bucket, then decode and average locally."""
    buffer = bucket.buffer()
    index = state._bucket_index(bucket)
    if state.feedback is None:
        payload = state.codec.encode(buffer)
    else:
        compensated = state.feedback.compensate(index, buffer)
        payload = state.codec.encode(compensated)
        state.feedback.update(index, compensated, state.codec.decode(payload))
    state._count(buffer, payload.nbytes)
    world = state.world_size()
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in payload.tensors]
    futures = [
        dist.all_gather(slots, t, group=state.process_group, async_op=True).get_future()
        for slots, t in zip(gathered, payload.tensors, strict=True)
    ]

    def finish(done: Future[list[Future[Any]]]) -> torch.Tensor:
        for fut in done.value():
            fut.wait()  # re-raise a failed collective here
        # Summing in rank order on every rank keeps the replicas bit-identical.
        total = torch.zeros_like(buffer)
        for rank in range(world):
            parts = tuple(slots[rank] for slots in gathered)
            total += state.codec.decode(Payload(parts, payload.shape, payload.dtype))
        return buffer.copy_(total.div_(world))

    return torch.futures.collect_all(futures).then(finish)


class PowerSGDState(CompressionState):
    """State of "powersgd": rank, warm-started Q factors and error-feedback residuals.

    A gradient of shape ``(n, ...)`` is viewed as an ``n x m`` matrix and sent
    as ``P (n x r)`` and ``Q (m x r)`` when ``(n + m) * r * min_compression_rate
    < n * m``; other tensors (biases, small matrices) are all-reduced as is.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        rank: int,
        warm_start: bool = True,
        error_feedback: bool = True,
        seed: int = 0,
        min_compression_rate: float = 2.0,
    ) -> None:
        super().__init__("powersgd", process_group)
        self.rank = rank
        self.warm_start = warm_start
        self.error_feedback = error_feedback
        self.min_compression_rate = min_compression_rate
        self.errors: dict[int, torch.Tensor] = {}
        self.qs: dict[int, list[torch.Tensor]] = {}
        # Same seed on every rank: the initial Q must be identical everywhere.
        self.generator = torch.Generator().manual_seed(seed)

    def should_compress(self, rows: int, cols: int) -> bool:
        return (rows + cols) * self.rank * self.min_compression_rate < rows * cols

    def _forget(self, index: int) -> None:
        self.errors.pop(index, None)
        self.qs.pop(index, None)

    def initial_qs(self, index: int, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        stored = self.qs.get(index)
        shapes = [(m.shape[1], self.rank) for m in matrices]
        if self.warm_start and stored is not None and [tuple(q.shape) for q in stored] == shapes:
            return stored
        return [
            torch.randn(shape, generator=self.generator).to(m.device, m.dtype)
            for shape, m in zip(shapes, matrices, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["errors"] = {i: e.clone() for i, e in self.errors.items()}
        state["qs"] = {i: [q.clone() for q in qs] for i, qs in self.qs.items()}
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.errors = {int(i): e.clone() for i, e in state["errors"].items()}
        self.qs = {int(i): [q.clone() for q in qs] for i, qs in state["qs"].items()}
        self.generator.set_state(state["generator"])


def _orthonormal_columns(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p.float(), mode="reduced").Q.to(p.dtype)


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """One PowerSGD step: all-reduce P = M Q, orthonormalise, all-reduce Q = M^T P."""
    buffer = bucket.buffer()
    index = state._bucket_index(bucket)
    world = state.world_size()
    if state.error_feedback and index in state.errors and state.errors[index].shape == buffer.shape:
        buffer.add_(state.errors[index])  # M = gradient + what earlier steps left out
    grads = bucket.gradients()  # views into buffer, so edits land in the bucket
    dense: list[torch.Tensor] = []
    matrices: list[torch.Tensor] = []
    for g in grads:
        if g.dim() >= 2 and state.should_compress(g.shape[0], g[0].numel()):
            matrices.append(g.view(g.shape[0], -1))
        else:
            dense.append(g)
    qs = state.initial_qs(index, matrices)
    ps = [m @ q for m, q in zip(matrices, qs, strict=True)]
    first = torch.cat([g.reshape(-1) for g in dense] + [p.reshape(-1) for p in ps])
    q_numel = sum(q.numel() for q in qs)
    state._count(buffer, (first.numel() + q_numel) * buffer.element_size())
    fut = dist.all_reduce(first, group=state.process_group, async_op=True).get_future()

    def second(done: Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = done.value()[0]
        sizes = [g.numel() for g in dense] + [p.numel() for p in ps]
        pieces = list(torch.split(reduced, sizes))
        dense_avg = [piece.div_(world) for piece in pieces[: len(dense)]]
        ps_hat = [
            _orthonormal_columns(piece.view_as(p))
            for piece, p in zip(pieces[len(dense) :], ps, strict=True)
        ]
        local_qs = [m.t() @ p for m, p in zip(matrices, ps_hat, strict=True)]
        if state.error_feedback:
            # The residual is what this rank's own factors P Q_local^T miss.
            for m, p, q in zip(matrices, ps_hat, local_qs, strict=True):
                m.sub_(p @ q.t())
            for g in dense:
                g.zero_()
            state.errors[index] = buffer.clone()
        if local_qs:
            q_flat = torch.cat([q.reshape(-1) for q in local_qs])
            dist.all_reduce(q_flat, group=state.process_group, async_op=True).get_future().wait()
            q_flat.div_(world)
            mean_qs = [
                piece.view_as(q)
                for piece, q in zip(
                    torch.split(q_flat, [q.numel() for q in local_qs]), local_qs, strict=True
                )
            ]
        else:
            mean_qs = []
        for g, avg in zip(dense, dense_avg, strict=True):
            g.copy_(avg.view_as(g))
        for m, p, q in zip(matrices, ps_hat, mean_qs, strict=True):
            m.copy_(p @ q.t())
        if state.warm_start:
            state.qs[index] = mean_qs
        return buffer

    return fut.then(second)


Hook = Callable[[Any, dist.GradBucket], Future[torch.Tensor]]

_HOOK_OPTIONS: dict[str, dict[str, type]] = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "int8": {"stochastic": bool, "seed": int, "error_feedback": bool},
    "topk": {"fraction": float, "error_feedback": bool},
    "powersgd": {
        "rank": int,
        "warm_start": bool,
        "error_feedback": bool,
        "seed": int,
        "min_compression_rate": float,
    },
}


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    allowed = _HOOK_OPTIONS[name]
    for key, value in options.items():
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise ConfigError(
                f"unknown option {key!r} for compression {name!r}; valid options: {valid}"
            )
        kind = allowed[key]
        numeric = kind is float and isinstance(value, int)
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or numeric):
            raise ConfigError(f"compression option {key!r} must be {kind.__name__}, got {value!r}")
    if name == "powersgd":
        if options.get("rank", 1) < 1:
            raise ConfigError(f"powersgd rank must be an integer >= 1, got {options['rank']!r}")
        if options.get("min_compression_rate", 1.0) <= 0:
            raise ConfigError("powersgd min_compression_rate must be > 0")


def make_compression_hook(
    name: str, process_group: dist.ProcessGroup | None = None, **options: Any
) -> tuple[CompressionState, Hook]:
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    Options: int8 ``stochastic=True, seed=0, error_feedback=False`` (the seed is
    offset by the rank so ranks round independently); topk ``fraction=0.01,
    error_feedback=True``; powersgd ``rank=4, warm_start=True,
    error_feedback=True, seed=0, min_compression_rate=2.0``.
    """
    if name not in _HOOK_OPTIONS:
        raise ConfigError(
            f"unknown gradient compression {name!r}; choose one of: {', '.join(HOOK_NAMES)}"
        )
    _check_options(name, options)
    if name in ("none", "fp16", "bf16"):
        dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
        return AllReduceState(name, process_group, dtype), allreduce_hook
    if name == "int8":
        rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        codec: Codec = Int8Codec(
            stochastic=options.get("stochastic", True), seed=options.get("seed", 0) + rank
        )
        state = GatherState(name, process_group, codec, options.get("error_feedback", False))
        return state, gather_hook
    if name == "topk":
        codec = TopKCodec(options.get("fraction", 0.01))
        state = GatherState(name, process_group, codec, options.get("error_feedback", True))
        return state, gather_hook
    psgd = PowerSGDState(
        process_group,
        rank=options.get("rank", 4),
        warm_start=options.get("warm_start", True),
        error_feedback=options.get("error_feedback", True),
        seed=options.get("seed", 0),
        min_compression_rate=float(options.get("min_compression_rate", 2.0)),
    )
    return psgd, powersgd_hook
