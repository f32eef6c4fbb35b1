"""Weight quantization kernels: int8 per-row and int4 group-wise, with error bounds.

These are the pure tensor functions under :mod:`distml.memory.quantized_modules`.
A weight matrix is quantized row by row (a row is an output channel of a
``Linear`` or one token vector of an ``Embedding``), so a module can dequantize
just the rows it needs. int8 is symmetric with one scale per row. int4 splits
each row into groups of ``group_size`` columns (the row is zero-padded up to a
whole number of groups), gives each group its own scale (and, when asymmetric,
a zero point) and packs two 4-bit codes per ``uint8`` byte. Rounding is to
nearest, so every element is within half its scale of the original; the
``*_error_bound`` helpers state that bound per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distml.errors import ConfigError

INT8_MAX = 127
# Symmetric int4 codes live in [-7, 7] and are stored with an offset of 8, so
# the nibble 0 is never produced; asymmetric codes use the full [0, 15].
INT4_SYM_MAX = 7
INT4_SYM_OFFSET = 8
INT4_LEVELS = 15


@dataclass(frozen=True)
class Int4Layout:
    """How a row of ``cols`` values is cut into groups and packed into bytes."""

    cols: int
    group_size: int

    @property
    def groups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def padded_cols(self) -> int:
        return self.groups * self.group_size

    @property
    def packed_cols(self) -> int:
        return self.padded_cols // 2


def int4_layout(cols: int, group_size: int) -> Int4Layout:
    """The layout for rows of ``cols`` values; a group never exceeds the (even-rounded) row."""
    if group_size < 2 or group_size % 2:
        raise ConfigError(
            f"int4 group_size must be an even number >= 2, got {group_size}; "
            "set memory.quantization.group_size to e.g. 128"
        )
    # A group wider than the row would only store padding.
    effective = min(group_size, cols + cols % 2)
    return Int4Layout(cols=cols, group_size=max(effective, 2))


def _safe_scale(amax: Tensor, levels: float) -> Tensor:
    # An all-zero row or group gets scale 1 so that it stays exactly zero
    # instead of dividing by zero.
    scale = amax.float() / levels
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: returns ``(q int8 [rows, cols], scale fp32 [rows])``."""
    w = weight.detach().float()
    scale = _safe_scale(w.abs().amax(dim=1), INT8_MAX)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int8` for any leading index shape of ``q`` rows."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """Pack unsigned 4-bit codes (uint8 in [0, 15], even last dim) two per byte."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes with twice the last dimension."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_int4(
    weight: Tensor, group_size: int = 128, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None, Int4Layout]:
    """Group-wise int4 of a 2-D weight.

    Returns ``(packed uint8 [rows, padded_cols/2], scale fp32 [rows, groups],
    zero uint8 [rows, groups] or None when symmetric, layout)``.
    """
    rows, cols = weight.shape
    layout = int4_layout(cols, group_size)
    w = weight.detach().float()
    if layout.padded_cols != cols:
        w = torch.nn.functional.pad(w, (0, layout.padded_cols - cols))
    g = w.reshape(rows, layout.groups, layout.group_size)
    if symmetric:
        scale = _safe_scale(g.abs().amax(dim=2), INT4_SYM_MAX)
        q = torch.round(g / scale[..., None]).clamp_(-INT4_SYM_MAX, INT4_SYM_MAX)
        codes = (q + INT4_SYM_OFFSET).to(torch.uint8)
        zero = None
    else:
        # The range always includes 0 so the zero point is a valid code and
        # padding (zeros) is represented exactly.
        lo = g.amin(dim=2).clamp(max=0.0)
        hi = g.amax(dim=2).clamp(min=0.0)
        scale = _safe_scale(hi - lo, INT4_LEVELS)
        zero_f = torch.round(-lo / scale).clamp_(0, INT4_LEVELS)
        q = torch.round(g / scale[..., None]) + zero_f[..., None]
        codes = q.clamp_(0, INT4_LEVELS).to(torch.uint8)
        zero = zero_f.to(torch.uint8)
    packed = pack_int4(codes.reshape(rows, layout.padded_cols))
    return packed, scale, zero, layout


def dequantize_int4(
    packed: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    layout: Int4Layout,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_int4`; leading dims of ``packed`` index rows."""
    lead = packed.shape[:-1]
    codes = unpack_int4(packed).reshape(*lead, layout.groups, layout.group_size).float()
    offset = (
        torch.tensor(float(INT4_SYM_OFFSET), device=packed.device)
        if zero is None
        else zero.float().unsqueeze(-1)
    )
    w = (codes - offset) * scale.unsqueeze(-1)
    return w.reshape(*lead, layout.padded_cols)[..., : layout.cols].to(dtype)


def int8_error_bound(scale: Tensor, cols: int) -> Tensor:
    """Per-element bound ``|w - dequant(quant(w))| <= scale/2`` as a ``[rows, cols]`` tensor."""
    return (scale / 2).unsqueeze(1).expand(-1, cols)


def int4_error_bound(scale: Tensor, layout: Int4Layout) -> Tensor:
    """Per-element bound ``scale_group/2`` for an int4 weight, as a ``[rows, cols]`` tensor."""
    per_col = (scale / 2).repeat_interleave(layout.group_size, dim=1)
    return per_col[:, : layout.cols]
