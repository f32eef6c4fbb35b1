"""The binary tensor format and pipe frames: exact round trips and clear rejections."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from distml.serve.codec import (
    CodecError,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
)


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]
)
def test_tensor_round_trip_is_bit_exact(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 1, 4, 5)) * 50).astype(dtype)
    back = decode_tensor(encode_tensor(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    assert back.flags.writeable


def test_layout_is_magic_length_json_then_little_endian_bytes() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3)  # big-endian input is normalised
    data = encode_tensor(array)
    magic, length = struct.unpack_from("<4sI", data)
    header = json.loads(data[8 : 8 + length])
    assert magic == b"DMLT" and header == {"dtype": "int32", "shape": [2, 3]}
    assert data[8 + length :] == np.arange(6, dtype="<i4").tobytes()
    assert decode_tensor(data).tolist() == [[0, 1, 2], [3, 4, 5]]


def _body(header: object, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sI", b"DMLT", len(raw)) + raw + payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"DML", "shorter than its 8-byte prefix"),
        (b"PKL\x00" + b"\x00" * 8, "does not start with the magic"),
        (struct.pack("<4sI", b"DMLT", 999) + b"{}", "header length 999 exceeds the body"),
        (_body({"dtype": "object", "shape": [1]}), "tensor dtype 'object' is not supported"),
        (_body({"dtype": "float32", "shape": [2, -1]}), "must be a list of non-negative integers"),
        (
            _body({"dtype": "float32", "shape": [2, 2]}, b"\x00" * 12),
            "needs 16 bytes but the body has 12",
        ),
        (
            _body({"dtype": "float32", "shape": [1]}, b"\x00" * 8),
            "needs 4 bytes but the body has 8",
        ),
        (struct.pack("<4sI", b"DMLT", 3) + b"{x}", "header is not JSON"),
    ],
)
def test_malformed_tensor_bodies_are_rejected_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        decode_tensor(data)
    assert message in str(info.value)


def test_frame_carries_a_message_and_several_arrays() -> None:
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    b = np.linspace(0, 1, 5, dtype=np.float32)
    message, arrays = decode_frame(encode_frame({"op": "job", "id": 7, "top_k": None}, [a, b]))
    assert message == {"op": "job", "id": 7, "top_k": None}
    assert [x.dtype for x in arrays] == [np.int64, np.float32]
    np.testing.assert_array_equal(arrays[0], a)
    np.testing.assert_array_equal(arrays[1], b)
    assert decode_frame(encode_frame({"op": "stop"})) == ({"op": "stop"}, [])
