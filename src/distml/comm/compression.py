"""DDP communication hooks that compress gradients, selectable by name.

``make_compression_hook(name)`` returns ``(state, hook)`` for
``ddp_model.register_comm_hook(state, hook)``. "none", "fp16" and "bf16"
all-reduce (the half-precision ones in 16 bits, divided by the world size
first so the sum cannot overflow). "int8" and "topk" payloads are not
summable, so ranks all-gather them, decode and average locally, optionally
with error feedback. "powersgd" sends a rank-r factorisation of each gradient
matrix (warm-started, with error feedback). Every state counts bytes so the
run summary can report the compression ratio, and checkpoints its residuals
through ``state_dict`` / ``load_state_dict`` (plain tensors and ints).

This module deliberately does not use ``from __future__ import annotations``:
DDP inspects the hook's annotations at registration and rejects strings.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from distml.comm.codecs import Codec, Int8Codec, Payload, TopKCodec
from distml.errors import ConfigError

__all__ = [
    "HOOK_NAMES",
    "AllReduceState",
    "CompressionState",
    "GatherState",
    "ParamSlices",
    "PowerSGDState",
    "allreduce_hook",
    "gather_hook",
    "make_compression_hook",
    "powersgd_hook",
]

#: Names accepted by :func:`make_compression_hook`.
HOOK_NAMES = ("none", "fp16", "bf16", "int8", "topk", "powersgd")

Future = torch.futures.Future


class ParamSlices:
    """Per-bucket flat tensors stored by parameter, so they survive DDP's bucket rebuild.

    DDP regroups parameters into new buckets after its first iteration, and a
    resumed run starts from the initial grouping again, so a bucket index does
    not name the same parameters for a whole run. Each stored flat tensor
    remembers which parameter owns which slice; when a bucket's parameters
    change, the slices are regrouped. ``positions`` maps a parameter's
    ``data_ptr`` to the order in which the hook first saw it; checkpoints key
    slices by that position, which is the same in every run of the same model
    and DDP settings because DDP's initial grouping is deterministic.
    """

    def __init__(self, positions: dict[int, int]) -> None:
        self._positions = positions
        self._flats: dict[int, tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]] = {}
        self._loose: dict[int, torch.Tensor] = {}  # position -> 1-D slice

    def get(
        self, index: int, ptrs: tuple[int, ...], numels: tuple[int, ...]
    ) -> torch.Tensor | None:
        """The flat tensor for this bucket's parameters, or None if nothing is stored."""
        entry = self._flats.get(index)
        if entry is not None and entry[0] == ptrs:
            return entry[2]
        if entry is not None:
            self._unpack_all()  # DDP rebuilt its buckets: every grouping changed at once
        found = [self._loose.pop(self._positions[p], None) for p in ptrs]
        slices = [
            s if s is not None and s.numel() == n else None
            for s, n in zip(found, numels, strict=True)
        ]
        present = [s for s in slices if s is not None]
        if not present:
            return None
        return torch.cat(
            [
                s if s is not None else present[0].new_zeros(n)
                for s, n in zip(slices, numels, strict=True)
            ]
        )

    def put(
        self, index: int, ptrs: tuple[int, ...], numels: tuple[int, ...], flat: torch.Tensor
    ) -> None:
        self._flats[index] = (ptrs, numels, flat)
        for ptr in ptrs:  # a slice unpacked while this bucket was in flight is now stale
            self._loose.pop(self._positions[ptr], None)

    def _unpack_all(self) -> None:
        self._loose.update(self.by_position())
        self._flats.clear()

    def by_position(self) -> dict[int, torch.Tensor]:
        """Every stored slice (1-D) keyed by its parameter's first-seen position."""
        out = dict(self._loose)
        for ptrs, numels, flat in self._flats.values():
            for ptr, piece in zip(ptrs, torch.split(flat, list(numels)), strict=True):
                out[self._positions[ptr]] = piece
        return out

    def of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The slice stored for ``param``, shaped like it (None when there is none)."""
        position = self._positions.get(param.data_ptr())
        piece = self.by_position().get(position) if position is not None else None
        if piece is None or piece.numel() != param.numel():
            return None
        return piece.view(param.shape)

    def state_dict(self) -> dict[int, torch.Tensor]:
        return {k: v.clone() for k, v in self.by_position().items()}

    def load_state_dict(self, state: Mapping[int, torch.Tensor]) -> None:
        self._flats.clear()
        self._loose = {int(k): v.clone().reshape(-1) for k, v in state.items()}


class CompressionState:
    """What every hook state has: the process group, byte counters, parameter positions."""

    def __init__(self, name: str, process_group: dist.ProcessGroup | None = None) -> None:
        self.name = name
        self.process_group = process_group
        self.bytes_uncompressed = 0
        self.bytes_sent = 0
        self._positions: dict[int, int] = {}

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

    def _layout(self, bucket: dist.GradBucket) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Data pointers and sizes of the bucket's parameters, in buffer order."""
        params = bucket.parameters()
        ptrs = tuple(p.data_ptr() for p in params)
        numels = tuple(p.numel() for p in params)
        if sum(numels) != bucket.buffer().numel():
            raise RuntimeError("DDP bucket buffer is not its parameters laid end to end")
        for ptr in ptrs:
            self._positions.setdefault(ptr, len(self._positions))
        return ptrs, numels

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes_uncompressed": self.bytes_uncompressed,
            "bytes_sent": self.bytes_sent,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ConfigError(
                f"compression state was saved for {state['name']!r} but the run uses "
                f"{self.name!r}; resume with the same compression or start fresh"
            )
        self.bytes_uncompressed = int(state["bytes_uncompressed"])
        self.bytes_sent = int(state["bytes_sent"])


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
    """State of "int8" and "topk": the codec and, optionally, per-parameter residuals."""

    def __init__(
        self,
        name: str,
        process_group: dist.ProcessGroup | None,
        codec: Codec,
        error_feedback: bool,
    ) -> None:
        super().__init__(name, process_group)
        self.codec = codec
        self.residuals = ParamSlices(self._positions) if error_feedback else None

    def residual_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """What error feedback still owes ``param`` (None before its first step)."""
        return self.residuals.of(param) if self.residuals is not None else None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["codec"] = self.codec.state_dict()
        if self.residuals is not None:
            state["residuals"] = self.residuals.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.codec.load_state_dict(state.get("codec", {}))
        if self.residuals is not None and "residuals" in state:
            self.residuals.load_state_dict(state["residuals"])


def gather_hook(state: GatherState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """All-gather every rank's encoded bucket, then decode and average locally."""
    buffer = bucket.buffer()
    if state.residuals is None:
        payload = state.codec.encode(buffer)
    else:
        index = bucket.index()
        ptrs, numels = state._layout(bucket)
        owed = state.residuals.get(index, ptrs, numels)
        compensated = buffer + owed.to(buffer) if owed is not None else buffer
        payload = state.codec.encode(compensated)
        unsent = compensated - state.codec.decode(payload)
        state.residuals.put(index, ptrs, numels, unsent)
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
        self.errors = ParamSlices(self._positions)
        self.qs = ParamSlices(self._positions)
        # Same seed on every rank: the initial Q must be identical everywhere.
        self.generator = torch.Generator().manual_seed(seed)

    def should_compress(self, rows: int, cols: int) -> bool:
        return (rows + cols) * self.rank * self.min_compression_rate < rows * cols

    def error_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The error-feedback residual of ``param`` (None before its first step)."""
        return self.errors.of(param)

    def initial_qs(
        self, index: int, ptrs: tuple[int, ...], matrices: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        numels = tuple(m.shape[1] * self.rank for m in matrices)
        stored = self.qs.get(index, ptrs, numels) if self.warm_start else None
        if stored is not None:
            pieces = torch.split(stored.to(matrices[0]), list(numels))
            return [q.view(m.shape[1], self.rank) for q, m in zip(pieces, matrices, strict=True)]
        return [
            torch.randn(m.shape[1], self.rank, generator=self.generator).to(m) for m in matrices
        ]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["errors"] = self.errors.state_dict()
        state["qs"] = self.qs.state_dict()
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.errors.load_state_dict(state["errors"])
        self.qs.load_state_dict(state["qs"])
        self.generator.set_state(state["generator"])


def _orthonormal_columns(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p.float(), mode="reduced").Q.to(p.dtype)


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """One PowerSGD step: all-reduce P = M Q, orthonormalise, all-reduce Q = M^T P.

    Both collectives are issued here, in bucket order, and waited for. Chaining
    the second one in a future callback would issue it from a gloo worker
    thread, racing the next bucket's first collective, and ranks could then
    pair up different collectives.
    """
    buffer = bucket.buffer()
    index = bucket.index()
    ptrs, numels = state._layout(bucket)
    world = state.world_size()
    if state.error_feedback:
        owed = state.errors.get(index, ptrs, numels)
        if owed is not None:
            buffer.add_(owed.to(buffer))  # M = gradient + what earlier steps left out
    dense: list[torch.Tensor] = []
    matrices: list[torch.Tensor] = []
    matrix_ptrs: list[int] = []
    for ptr, g in zip(ptrs, bucket.gradients(), strict=True):  # views into the buffer
        if g.dim() >= 2 and state.should_compress(g.shape[0], g[0].numel()):
            matrices.append(g.view(g.shape[0], -1))
            matrix_ptrs.append(ptr)
        else:
            dense.append(g)
    qs = state.initial_qs(index, tuple(matrix_ptrs), matrices)
    ps = [m @ q for m, q in zip(matrices, qs, strict=True)]
    first = torch.cat([g.reshape(-1) for g in dense] + [p.reshape(-1) for p in ps])
    q_numels = tuple(q.numel() for q in qs)
    state._count(buffer, (first.numel() + sum(q_numels)) * buffer.element_size())

    dist.all_reduce(first, group=state.process_group)
    pieces = torch.split(first, [g.numel() for g in dense] + [p.numel() for p in ps])
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
        state.errors.put(index, ptrs, numels, buffer.clone())
    mean_qs: list[torch.Tensor] = []
    if local_qs:
        q_flat = torch.cat([q.reshape(-1) for q in local_qs])
        dist.all_reduce(q_flat, group=state.process_group)
        q_flat.div_(world)
        mean_qs = [
            piece.view_as(q)
            for piece, q in zip(torch.split(q_flat, list(q_numels)), local_qs, strict=True)
        ]
        if state.warm_start:
            state.qs.put(index, tuple(matrix_ptrs), q_numels, q_flat)
    for g, avg in zip(dense, dense_avg, strict=True):
        g.copy_(avg.view_as(g))
    for m, p, q in zip(matrices, ps_hat, mean_qs, strict=True):
        m.copy_(p @ q.t())
    done: Future[torch.Tensor] = Future()
    done.set_result(buffer)
    return done


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


def check_compression_options(name: str, options: Mapping[str, Any]) -> None:
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
    check_compression_options(name, options)
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
