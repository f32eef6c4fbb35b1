"""Binary encodings of numpy arrays: the HTTP tensor format and the replica pipe frames.

``application/x-distml-tensor`` is one array: the 4-byte magic ``DMLT``, a
little-endian uint32 header length, a UTF-8 JSON header ``{"dtype", "shape"}``
and the raw little-endian bytes in C order. Replica pipes carry *frames*: the
magic ``DMLF``, a length-prefixed JSON header (message fields plus the dtype,
shape and byte offset of each array) and the concatenated array bytes. Neither
format ever pickles: a peer can only make us build arrays of allowed dtypes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

TENSOR_CONTENT_TYPE = "application/x-distml-tensor"
_TENSOR_MAGIC = b"DMLT"
_FRAME_MAGIC = b"DMLF"
_PREFIX = struct.Struct("<4sI")
#: Dtypes accepted from the network; object and void dtypes would not be plain data.
ALLOWED_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool")
_MAX_HEADER = 1 << 16


class CodecError(ValueError):
    """A tensor body or frame is malformed; the message names what is wrong."""


def _le(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian view or copy of ``array``."""
    out = np.ascontiguousarray(array)
    if out.dtype.byteorder == ">":
        out = out.astype(out.dtype.newbyteorder("<"))
    return out


def _dtype_of(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise CodecError(f"tensor dtype {name!r} is not supported; use one of {ALLOWED_DTYPES}")
    return np.dtype(name).newbyteorder("<")


def _shape_of(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CodecError(f"tensor shape {shape!r} must be a list of non-negative integers")
    return tuple(shape)


def _read_header(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], int]:
    if len(data) < _PREFIX.size:
        raise CodecError(f"{what} is {len(data)} bytes, shorter than its 8-byte prefix")
    got, length = _PREFIX.unpack_from(data)
    if got != magic:
        raise CodecError(f"{what} does not start with the magic {magic!r}")
    if length > _MAX_HEADER or _PREFIX.size + length > len(data):
        raise CodecError(f"{what} header length {length} exceeds the body")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"{what} header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CodecError(f"{what} header must be a JSON object")
    return header, _PREFIX.size + length


def _array_from(buffer: bytes, start: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if start + nbytes > len(buffer):
        raise CodecError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {nbytes} bytes "
            f"but the body has {len(buffer) - start}"
        )
    flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=start)
    # Native byte order and a writable copy: callers hand these to torch.
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def encode_tensor(array: np.ndarray) -> bytes:
    """One array in the HTTP tensor format."""
    array = _le(array)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise CodecError(f"tensor dtype {array.dtype.name!r} is not supported")
    header = json.dumps({"dtype": array.dtype.name, "shape": list(array.shape)}).encode()
    return _PREFIX.pack(_TENSOR_MAGIC, len(header)) + header + array.tobytes()


def decode_tensor(data: bytes) -> np.ndarray:
    """The array of an HTTP tensor body; :class:`CodecError` names any defect."""
    header, start = _read_header(data, _TENSOR_MAGIC, "tensor body")
    dtype = _dtype_of(header.get("dtype"))
    shape = _shape_of(header.get("shape"))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - start != nbytes:
        raise CodecError(
            f"tensor of shape {list(shape)} and dtype {dtype.name} needs {nbytes} bytes "
            f"but the body has {len(data) - start}"
        )
    return _array_from(data, start, dtype, shape)


def encode_frame(message: dict[str, Any], arrays: list[np.ndarray] | tuple[()] = ()) -> bytes:
    """A pipe frame: JSON ``message`` plus any number of arrays."""
    specs = []
    chunks = []
    offset = 0
    for array in arrays:
        a = _le(array)
        specs.append({"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset})
        raw = a.tobytes()
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"message": message, "arrays": specs}).encode()
    return _PREFIX.pack(_FRAME_MAGIC, len(header)) + header + b"".join(chunks)


def decode_frame(data: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    header, start = _read_header(data, _FRAME_MAGIC, "frame")
    arrays = []
    for spec in header.get("arrays", []):
        dtype = _dtype_of(spec["dtype"])
        arrays.append(
            _array_from(data, start + int(spec["offset"]), dtype, _shape_of(spec["shape"]))
        )
    message = header.get("message")
    if not isinstance(message, dict):
        raise CodecError("frame message must be a JSON object")
    return message, arrays
