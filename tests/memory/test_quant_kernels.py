"""int8 / int4 weight quantization kernels: analytic error bounds, packing, storage size."""

from __future__ import annotations

import pytest
import torch

from distml.errors import ConfigError
from distml.memory.quantization import (
    dequantize_int4,
    dequantize_int8,
    int4_error_bound,
    int4_layout,
    int8_error_bound,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

SHAPES = [(1, 1), (7, 13), (64, 300), (3, 1000), (16, 128)]


def _weights(rows: int, cols: int) -> torch.Tensor:
    # Rows of very different magnitude plus an outlier: per-row scales must cope.
    w = torch.randn(rows, cols) * torch.logspace(-3, 1, rows)[:, None]
    w[0, 0] = 25.0
    return w


def _fp_slack(w: torch.Tensor) -> torch.Tensor:
    # Float rounding in w/scale and q*scale: a few ulps of the row magnitude.
    return 4 * torch.finfo(torch.float32).eps * w.abs().amax(dim=1, keepdim=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_within_half_scale(shape: tuple[int, int]) -> None:
    w = _weights(*shape)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_int8(q, scale)).abs()
    bound = int8_error_bound(scale, shape[1])
    assert bool((err <= bound + _fp_slack(w)).all())
    if shape[1] >= 100:  # the bound is tight, not vacuous
        assert float((err / bound).max()) > 0.9


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [128, 32, 6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_error_within_half_group_scale(
    shape: tuple[int, int], group_size: int, symmetric: bool
) -> None:
    w = _weights(*shape)
    packed, scale, zero, layout = quantize_int4(w, group_size, symmetric)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], layout.padded_cols // 2)
    assert scale.shape == (shape[0], layout.groups)
    assert (zero is None) == symmetric
    err = (w - dequantize_int4(packed, scale, zero, layout)).abs()
    bound = int4_error_bound(scale, layout)
    assert bound.shape == w.shape
    assert bool((err <= bound + _fp_slack(w)).all())
    if shape[1] >= 100:
        assert float((err / bound).max()) > 0.9


def test_int4_group_padding_layout() -> None:
    layout = int4_layout(300, 128)
    assert (layout.groups, layout.padded_cols, layout.packed_cols) == (3, 384, 192)
    # A group is never wider than the (even-rounded) row, so no byte stores only padding.
    assert int4_layout(13, 128).group_size == 14
    assert int4_layout(1, 128).padded_cols == 2


def test_asymmetric_int4_beats_symmetric_on_one_sided_weights() -> None:
    w = torch.rand(32, 256) + 0.5  # all positive: symmetric wastes half its codes
    errs = []
    for symmetric in (True, False):
        packed, scale, zero, layout = quantize_int4(w, 64, symmetric)
        errs.append(float((w - dequantize_int4(packed, scale, zero, layout)).abs().mean()))
    assert errs[1] < 0.6 * errs[0]


def test_pack_int4_roundtrip_and_nibble_order() -> None:
    codes = torch.randint(0, 16, (5, 38), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 19)
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]


def test_int4_storage_is_an_eighth_of_fp32_plus_scales() -> None:
    rows, cols = 256, 1000
    packed, scale, _, _ = quantize_int4(torch.randn(rows, cols), 128, True)
    fp32_bytes = rows * cols * 4
    data_bytes = packed.numel() * packed.element_size()
    assert data_bytes == rows * 1024 // 2  # two codes per byte over the padded row
    scale_bytes = scale.numel() * scale.element_size()
    assert scale_bytes == rows * 8 * 4
    assert (data_bytes + scale_bytes) / fp32_bytes < 0.14


def test_zero_rows_stay_exactly_zero() -> None:
    w = torch.zeros(3, 40)
    w[1] = torch.randn(40)
    q, scale = quantize_int8(w)
    assert torch.equal(dequantize_int8(q, scale)[[0, 2]], torch.zeros(2, 40))
    packed, s4, z4, layout = quantize_int4(w, 16, symmetric=False)
    assert torch.equal(dequantize_int4(packed, s4, z4, layout)[[0, 2]], torch.zeros(2, 40))


def test_dequantize_selected_rows_matches_full() -> None:
    w = torch.randn(10, 50)
    packed, scale, zero, layout = quantize_int4(w, 16, symmetric=False)
    assert zero is not None
    ids = torch.tensor([[3, 3], [9, 0]])
    rows = dequantize_int4(packed[ids], scale[ids], zero[ids], layout)
    assert torch.equal(rows, dequantize_int4(packed, scale, zero, layout)[ids])


@pytest.mark.parametrize("group_size", [0, 7, -2])
def test_bad_group_size_is_a_config_error(group_size: int) -> None:
    with pytest.raises(ConfigError, match=r"int4 group_size must be an even number >= 2, got"):
        quantize_int4(torch.randn(2, 8), group_size)
