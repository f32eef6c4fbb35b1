"""Gradient codecs: lossy encodings of a tensor into a few payload tensors and back.

A codec turns one tensor into a :class:`Payload` (plain tensors whose shapes
depend only on the input's size, so peers can all-gather them) and decodes a
payload back into a dense tensor. Codecs are stateless apart from an optional
seeded RNG, so the DDP hooks in :mod:`distml.comm.compression`, the parameter
server's push/pull and federated uploads all share them. :class:`ErrorFeedback`
keeps the part of each tensor a lossy codec did not send and adds it back the
next time the same key is encoded, which makes top-k and int8 converge like
uncompressed training.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distml.errors import ConfigError

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "ErrorFeedback",
    "FeedbackEncoder",
    "HalfCodec",
    "IdentityCodec",
    "Int8Codec",
    "Payload",
    "TopKCodec",
    "make_codec",
]


@dataclass(frozen=True)
class Payload:
    """What a codec sends: tensors plus the original shape and dtype needed to decode."""

    tensors: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (the tensors; shape and dtype are known to both sides)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Codec:
    """Base class: ``encode(tensor) -> Payload`` and ``decode(payload) -> tensor``."""

    name: str = ""

    def encode(self, tensor: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


class IdentityCodec(Codec):
    """Sends the tensor unchanged (the uncompressed baseline)."""

    name = "none"

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload((tensor.reshape(-1),), tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].reshape(payload.shape).to(payload.dtype)


class HalfCodec(Codec):
    """Casts to float16 or bfloat16: half the bytes, relative error 2^-11 or 2^-8.

    float16 overflows above 65504; callers that sum payloads should scale first.
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfCodec needs float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload((tensor.reshape(-1).to(self.dtype),), tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].to(payload.dtype).reshape(payload.shape)


class Int8Codec(Codec):
    """Symmetric int8 quantisation with one float32 scale per tensor.

    ``scale = max|x| / 127`` and ``q = round(x / scale)``. With stochastic
    rounding, ``q = floor(x / scale + u)`` with ``u ~ U[0, 1)`` drawn from a
    seeded generator, so ``E[decode(encode(x))] = x`` (unbiased) and every
    element is within one ``scale`` of ``x``; round-to-nearest is within half
    a scale but biased.
    """

    name = "int8"

    def __init__(self, stochastic: bool = True, seed: int = 0) -> None:
        self.stochastic = stochastic
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending_state is not None:
                gen.set_state(self._pending_state)
                self._pending_state = None
            self._generator = gen
        return gen

    @staticmethod
    def scale_of(tensor: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale (shape ``(1,)``, float32); 1 for an all-zero tensor."""
        amax = tensor.detach().abs().max().to(torch.float32).reshape(1)
        return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            scale = torch.ones(1, device=flat.device)
            return Payload((flat.to(torch.int8), scale), tuple(tensor.shape), tensor.dtype)
        scale = self.scale_of(flat)
        scaled = flat / scale
        if self.stochastic:
            noise = torch.rand(
                scaled.shape, generator=self._generator_for(scaled.device), device=scaled.device
            )
            levels = torch.floor(scaled + noise)
        else:
            levels = torch.round(scaled)
        quantized = levels.clamp_(-127, 127).to(torch.int8)
        return Payload((quantized, scale), tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        quantized, scale = payload.tensors
        return (quantized.to(torch.float32) * scale).to(payload.dtype).reshape(payload.shape)

    def state_dict(self) -> dict[str, Any]:
        if self._generator is not None:
            return {"generator": self._generator.get_state()}
        if self._pending_state is not None:
            return {"generator": self._pending_state}
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            # Applied when the generator is (re)built on the tensor's device.
            self._pending_state = state["generator"]
            self._generator = None


class TopKCodec(Codec):
    """Keeps the ``k = ceil(fraction * numel)`` largest-magnitude entries: values + int indices.

    Indices are int32 (int64 only past 2^31 elements), so a kept entry costs 8
    bytes and the ratio against float32 is ``1 / (2 * fraction)``.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(f"topk fraction must be a number in (0, 1], got {fraction!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ConfigError(f"topk fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def k_for(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.detach().reshape(-1)
        k = self.k_for(flat.numel()) if flat.numel() else 0
        indices = torch.topk(flat.abs(), k, sorted=False).indices
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return Payload((flat[indices], indices.to(index_dtype)), tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        values, indices = payload.tensors
        dense = torch.zeros(payload.numel, dtype=payload.dtype, device=values.device)
        dense.index_add_(0, indices.to(torch.int64), values.to(payload.dtype))
        return dense.reshape(payload.shape)


#: Names accepted by :func:`make_codec`.
CODEC_NAMES = ("none", "fp16", "bf16", "int8", "topk")

_CODEC_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "fp16": (),
    "bf16": (),
    "int8": ("stochastic", "seed"),
    "topk": ("fraction",),
}


def make_codec(name: str, **options: Any) -> Codec:
    """Build a codec by name; unknown names or options raise :class:`ConfigError`."""
    if name not in _CODEC_OPTIONS:
        raise ConfigError(f"unknown codec {name!r}; choose one of: {', '.join(CODEC_NAMES)}")
    unknown = sorted(set(options) - set(_CODEC_OPTIONS[name]))
    if unknown:
        valid = ", ".join(_CODEC_OPTIONS[name]) or "none"
        raise ConfigError(
            f"unknown option {unknown[0]!r} for codec {name!r}; valid options: {valid}"
        )
    if name == "none":
        return IdentityCodec()
    if name in ("fp16", "bf16"):
        return HalfCodec(torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "int8":
        return Int8Codec(
            stochastic=bool(options.get("stochastic", True)), seed=int(options.get("seed", 0))
        )
    return TopKCodec(options.get("fraction", 0.01))


class ErrorFeedback:
    """Per-key residuals: what a lossy codec left out, added back at the next encode.

    Keys are bucket indices for DDP hooks and parameter names for push/upload
    paths. A stored residual whose shape no longer matches is dropped, since it
    belongs to a different layout (for example after DDP rebuilds its buckets).
    """

    def __init__(self) -> None:
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor + residual[key]`` as a new tensor (the input is left untouched)."""
        residual = self.residuals.get(key)
        if residual is None or residual.shape != tensor.shape:
            return tensor.detach().clone()
        return tensor.detach() + residual.to(tensor.dtype)

    def update(self, key: Hashable, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember ``compensated - sent`` (``sent`` being what the receiver decodes)."""
        self.residuals[key] = (compensated - sent).detach()

    def reset(self, key: Hashable | None = None) -> None:
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}


class FeedbackEncoder:
    """A codec with optional error feedback, for push and upload paths keyed by name.

    ``encode(key, tensor)`` compensates with the stored residual, encodes, and
    stores the new residual; ``decode`` is the codec's. Byte counters feed the
    run summary.
    """

    def __init__(self, codec: Codec, error_feedback: bool = True) -> None:
        self.codec = codec
        self.feedback = ErrorFeedback() if error_feedback else None
        self.bytes_uncompressed = 0
        self.bytes_sent = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    def encode(self, key: Hashable, tensor: torch.Tensor) -> Payload:
        if self.feedback is None:
            payload = self.codec.encode(tensor)
        else:
            compensated = self.feedback.compensate(key, tensor)
            payload = self.codec.encode(compensated)
            self.feedback.update(key, compensated, self.codec.decode(payload))
        self.bytes_uncompressed += tensor.numel() * tensor.element_size()
        self.bytes_sent += payload.nbytes
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        return self.codec.decode(payload)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "codec": self.codec.state_dict(),
            "bytes_uncompressed": self.bytes_uncompressed,
            "bytes_sent": self.bytes_sent,
        }
        if self.feedback is not None:
            state["feedback"] = self.feedback.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.codec.load_state_dict(state.get("codec", {}))
        self.bytes_uncompressed = int(state["bytes_uncompressed"])
        self.bytes_sent = int(state["bytes_sent"])
        if self.feedback is not None and "feedback" in state:
            self.feedback.load_state_dict(state["feedback"])
