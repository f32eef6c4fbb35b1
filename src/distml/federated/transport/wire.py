"""Payloads on the wire: codec-encoded parameters as safetensors, cut into checksummed chunks.

A model or update travels as safetensors bytes whose keys are ``"i.j"``: the
j-th payload tensor of the i-th parameter under a codec from
:mod:`distml.comm.codecs` (``none`` and ``fp16`` keep the tensor's shape,
``int8`` adds a per-tensor scale, ``topk`` sends values and indices). Shapes
are not sent: the receiver knows the model and checks every tensor against
it, so a malformed, oversized or mismatched payload is rejected with one line
naming the offending parameter before it can reach aggregation. Payloads are
streamed in chunks; :class:`Assembler` reassembles them and checks the
declared size, a size limit and the SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from distml.comm.codecs import FeedbackEncoder, make_codec
from distml.errors import UserError
from distml.federated.parameters import Parameters

UPLOAD_CODECS = ("none", "fp16", "int8", "topk")
DOWNLOAD_CODECS = ("none", "fp16", "int8")


class PayloadError(UserError):
    """A payload is malformed or does not fit the model (gRPC INVALID_ARGUMENT)."""


class PayloadTooLarge(PayloadError):
    """A payload exceeds the receiver's size limit (gRPC RESOURCE_EXHAUSTED)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_encoder(
    codec: str,
    *,
    topk_fraction: float = 0.01,
    error_feedback: bool = False,
    stochastic: bool = False,
    seed: int = 0,
) -> FeedbackEncoder:
    """A :class:`FeedbackEncoder` for ``codec``; ``stochastic`` int8 rounding is unbiased."""
    if codec not in UPLOAD_CODECS:
        raise PayloadError(f"unknown codec {codec!r}; choose one of: {', '.join(UPLOAD_CODECS)}")
    options: dict[str, object] = {}
    if codec == "topk":
        options["fraction"] = topk_fraction
    if codec == "int8":
        options.update(stochastic=stochastic, seed=seed)
    lossy = codec in ("int8", "topk")
    return FeedbackEncoder(make_codec(codec, **options), error_feedback=error_feedback and lossy)


def encode_parameters(params: Sequence[torch.Tensor], encoder: FeedbackEncoder) -> bytes:
    """Safetensors bytes of every tensor (as float32) encoded by ``encoder``."""
    tensors: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(params):
        t = tensor.detach().to(torch.float32)
        parts = list(encoder.encode(i, t).tensors)
        if encoder.codec.name in ("none", "fp16", "int8"):
            parts[0] = parts[0].reshape(t.shape)
        for j, part in enumerate(parts):
            tensors[f"{i}.{j}"] = part.contiguous().cpu()
    return st_save(tensors)


def decode_parameters(
    data: bytes, codec: str, names: Sequence[str], shapes: Sequence[tuple[int, ...]]
) -> Parameters:
    """float32 tensors of the given shapes from :func:`encode_parameters` bytes; validates all."""
    if codec not in UPLOAD_CODECS:
        raise PayloadError(f"unknown codec {codec!r}; choose one of: {', '.join(UPLOAD_CODECS)}")
    try:
        tensors = st_load(data)
    except Exception:
        raise PayloadError(
            "payload is not valid safetensors data; encode it with encode_parameters()"
        ) from None
    parts_per_tensor = 1 if codec in ("none", "fp16") else 2
    expected = {f"{i}.{j}" for i in range(len(names)) for j in range(parts_per_tensor)}
    if set(tensors) != expected:
        got = len({k.split(".")[0] for k in tensors})
        raise PayloadError(
            f"payload holds {len(tensors)} tensors for {got} parameters, the model has "
            f"{len(names)} parameters ({parts_per_tensor} tensor(s) each under codec {codec!r}); "
            "send parameters of the model the server sent"
        )
    out: Parameters = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        parts = [tensors[f"{i}.{j}"] for j in range(parts_per_tensor)]
        value = _decode_one(codec, name, tuple(shape), parts)
        if not bool(torch.isfinite(value).all()):
            raise PayloadError(f"parameter {name!r} contains NaN or inf; send finite values")
        out.append(value)
    return out


def _decode_one(
    codec: str, name: str, shape: tuple[int, ...], parts: list[torch.Tensor]
) -> torch.Tensor:
    numel = 1
    for dim in shape:
        numel *= dim
    main = parts[0]
    if codec in ("none", "fp16", "int8"):
        want = {"none": torch.float32, "fp16": torch.float16, "int8": torch.int8}[codec]
        _check(
            main.dtype == want,
            f"parameter {name!r} has dtype {main.dtype}, codec {codec!r} sends {want}",
        )
        _check(
            tuple(main.shape) == shape,
            f"parameter {name!r} has shape {tuple(main.shape)}, the model expects {shape}; "
            "train the model architecture the server sends",
        )
        if codec != "int8":
            return main.to(torch.float32)
        scale = parts[1]
        _check(
            scale.dtype == torch.float32 and tuple(scale.shape) == (1,),
            f"parameter {name!r}: int8 scale must be one float32, got {scale.dtype} "
            f"{tuple(scale.shape)}",
        )
        return main.to(torch.float32) * scale
    values, indices = parts
    _check(
        values.dtype == torch.float32 and values.ndim == 1,
        f"parameter {name!r}: topk values must be 1-D float32, got {values.dtype} "
        f"{tuple(values.shape)}",
    )
    _check(
        indices.dtype in (torch.int32, torch.int64) and tuple(indices.shape) == tuple(values.shape),
        f"parameter {name!r}: topk indices must be int32/int64 matching the values, got "
        f"{indices.dtype} {tuple(indices.shape)}",
    )
    _check(
        len(values) <= numel,
        f"parameter {name!r}: {len(values)} topk entries for a tensor of {numel} elements "
        f"(shape {shape}); train the model architecture the server sends",
    )
    idx = indices.to(torch.int64)
    _check(
        len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numel),
        f"parameter {name!r}: topk indices fall outside 0..{numel - 1} (shape {shape}); "
        "train the model architecture the server sends",
    )
    dense = torch.zeros(numel, dtype=torch.float32)
    dense.index_add_(0, idx, values)
    return dense.reshape(shape)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PayloadError(message)


def iter_chunks(data: bytes, chunk_size: int) -> Iterator[bytes]:
    """``data`` in slices of at most ``chunk_size`` bytes (nothing for empty data)."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield bytes(view[start : start + chunk_size])


class Assembler:
    """Reassembles a chunked payload and checks its declared size, limit and SHA-256."""

    def __init__(self, declared_size: int, sha256: str, limit: int, what: str = "payload") -> None:
        if declared_size < 0:
            raise PayloadError(f"{what} declares a negative size ({declared_size})")
        if declared_size > limit:
            raise PayloadTooLarge(
                f"{what} of {declared_size} bytes exceeds the limit of {limit} bytes; send an "
                "update of the server's model (or raise federated.max_upload_mb)"
            )
        self.declared_size = declared_size
        self.sha256 = sha256
        self.what = what
        self._parts: list[bytes] = []
        self._received = 0

    @property
    def received(self) -> int:
        return self._received

    def add(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self.declared_size:
            raise PayloadError(
                f"{self.what} sent more than the {self.declared_size} bytes its header declared"
            )
        self._parts.append(chunk)

    def finish(self) -> bytes:
        if self._received != self.declared_size:
            raise PayloadError(
                f"{self.what} ended after {self._received} of {self.declared_size} declared bytes"
            )
        data = b"".join(self._parts)
        self._parts = []
        if sha256_hex(data) != self.sha256:
            raise PayloadError(f"{self.what} checksum mismatch (SHA-256); resend it")
        return data
