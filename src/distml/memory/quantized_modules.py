"""Quantized drop-in modules and :func:`quantize_model`, post-training weight quantization.

``QuantizedLinear`` and ``QuantizedEmbedding`` keep their weight as integer
buffers (int8 rows, or packed int4 groups) plus fp32 scales and dequantize on
the fly, so the float weight never stays resident. Linear layers compute with
``compute="dequant"`` (weight-only: exact up to the weight error) by default;
``compute="int8"`` (8-bit only) also quantizes activations per token and runs
``torch._int_mm``, which on CPU is several times faster but adds activation
rounding error. :func:`quantize_model` swaps modules in place.

Tied weights (one ``Parameter`` shared by several modules, e.g. a GPT
``lm_head`` tied to ``wte``): each member quantizes rows of the same matrix
the same way, so the group is quantized once and its modules share the same
buffers; serialisation stores them once. If any member is skipped, or the
parameter is also held by a module we do not replace, the whole group stays
float so the tie is never silently broken.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distml.errors import ConfigError
from distml.memory.quantization import (
    INT8_MAX,
    Int4Layout,
    dequantize_int4,
    dequantize_int8,
    int4_layout,
    quantize_int4,
    quantize_int8,
)

COMPUTE_MODES = ("dequant", "int8")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized; JSON-able via ``asdict``."""

    bits: int
    group_size: int  # effective int4 group size; 0 for int8
    symmetric: bool = True


def check_bits(bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ConfigError(
            f"quantization bits must be 8 or 4, got {bits}; set memory.quantization.bits to 8 or 4"
        )
    if bits == 4:
        int4_layout(1, group_size)  # validates group_size


class _QuantizedWeight(nn.Module):
    """Integer row-quantized weight buffers shared by the Linear and Embedding modules."""

    qweight: Tensor
    scale: Tensor
    zero: Tensor | None

    def __init__(
        self, rows: int, cols: int, spec: QuantSpec, dtype: torch.dtype, device: torch.device | None
    ) -> None:
        super().__init__()
        self.rows, self.cols, self.spec, self.dtype = rows, cols, spec, dtype
        self.layout: Int4Layout | None = None
        if spec.bits == 8:
            q = torch.zeros(rows, cols, dtype=torch.int8, device=device)
            scale = torch.ones(rows, dtype=torch.float32, device=device)
            zero = None
        else:
            self.layout = Int4Layout(cols=cols, group_size=spec.group_size)
            q = torch.zeros(rows, self.layout.packed_cols, dtype=torch.uint8, device=device)
            scale = torch.ones(rows, self.layout.groups, dtype=torch.float32, device=device)
            zero = (
                None
                if spec.symmetric
                else torch.zeros(rows, self.layout.groups, dtype=torch.uint8, device=device)
            )
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def set_from_float(self, weight: Tensor) -> None:
        if self.spec.bits == 8:
            q, scale = quantize_int8(weight)
            self.qweight, self.scale = q, scale
        else:
            packed, scale, zero, _ = quantize_int4(
                weight, self.spec.group_size, self.spec.symmetric
            )
            self.qweight, self.scale, self.zero = packed, scale, zero

    def share_buffers_of(self, other: _QuantizedWeight) -> None:
        self.qweight, self.scale, self.zero = other.qweight, other.scale, other.zero

    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """The float weight (``[rows, cols]``), or only the rows indexed by ``rows``."""
        q, scale = self.qweight, self.scale
        zero = self.zero
        if rows is not None:
            q, scale = q[rows], scale[rows]
            zero = None if zero is None else zero[rows]
        if self.layout is None:
            return dequantize_int8(q, scale, self.dtype)
        return dequantize_int4(q, scale, zero, self.layout, self.dtype)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, {asdict(self.spec)}"


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with an int8/int4 weight dequantized (or int8-multiplied) per call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        compute: str = "dequant",
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ConfigError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        if compute == "int8" and spec.bits != 8:
            raise ConfigError("compute='int8' needs bits=8; use compute='dequant' for int4")
        self.in_features, self.out_features, self.compute = in_features, out_features, compute
        self.weight_q = _QuantizedWeight(out_features, in_features, spec, dtype, device)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )

    @classmethod
    def from_float(
        cls, linear: nn.Linear, spec: QuantSpec, compute: str = "dequant"
    ) -> QuantizedLinear:
        w = linear.weight
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec,
            compute,
            w.dtype,
            w.device,
        )
        mod.weight_q.set_from_float(w)
        if linear.bias is not None and mod.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, for code that reads ``.weight`` directly (costs a full copy)."""
        return self.weight_q.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        if self.compute == "int8":
            return self._int8_forward(x)
        wq = self.weight_q
        if wq.layout is None:
            # Per-output-channel scales commute with the matmul: scaling the
            # output saves a full pass over the weight.
            y = F.linear(x, wq.qweight.to(x.dtype)) * wq.scale.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, wq.dequantize().to(x.dtype), self.bias)

    def _int8_forward(self, x: Tensor) -> Tensor:
        # Per-token symmetric activation quantization; _int_mm accumulates in int32.
        flat = x.reshape(-1, self.in_features).float()
        rows = flat.shape[0]
        if x.is_cuda and (self.in_features % 8 or self.out_features % 8):
            # cuBLAS int8 GEMM needs k and n multiples of 8.
            return F.linear(x, self.weight_q.dequantize().to(x.dtype), self.bias)
        sx = (flat.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(1e-12)
        xq = torch.round(flat / sx).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        if x.is_cuda:  # and m > 16, a multiple of 8: pad with zero rows
            xq = F.pad(xq, (0, 0, 0, max(24, -(-rows // 8) * 8) - rows))
        acc = torch._int_mm(xq, self.weight_q.qweight.t())[:rows]
        y = acc.float() * sx * self.weight_q.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute={self.compute}"
        )


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` whose table is int8/int4; only looked-up rows are dequantized."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spec: QuantSpec,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx  # kept for repr/compat; only matters for training
        self.weight_q = _QuantizedWeight(num_embeddings, embedding_dim, spec, dtype, device)

    @classmethod
    def from_float(cls, emb: nn.Embedding, spec: QuantSpec) -> QuantizedEmbedding:
        if emb.max_norm is not None:
            raise ConfigError(
                "cannot quantize an nn.Embedding with max_norm (forward rewrites its weight); "
                "add it to memory.quantization.skip"
            )
        w = emb.weight
        mod = cls(emb.num_embeddings, emb.embedding_dim, spec, emb.padding_idx, w.dtype, w.device)
        mod.weight_q.set_from_float(w)
        return mod

    @property
    def weight(self) -> Tensor:
        """The dequantized table, for code that reads ``.weight`` directly (costs a full copy)."""
        return self.weight_q.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_q.dequantize(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


QuantizedModule = QuantizedLinear | QuantizedEmbedding


def _spec_for(module: nn.Module, bits: int, group_size: int, symmetric: bool) -> QuantSpec:
    if bits == 8:
        return QuantSpec(bits=8, group_size=0, symmetric=True)
    if isinstance(module, nn.Linear):
        cols = module.in_features
    elif isinstance(module, nn.Embedding):
        cols = module.embedding_dim
    else:
        raise TypeError(f"cannot quantize {type(module).__name__}")
    return QuantSpec(
        bits=4, group_size=int4_layout(cols, group_size).group_size, symmetric=symmetric
    )


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantizable_groups(model: nn.Module, skip: Iterable[str] = ()) -> list[list[str]]:
    """Names of ``nn.Linear``/``nn.Embedding`` modules to quantize, grouped by tied weight.

    Only exact ``nn.Linear``/``nn.Embedding`` types qualify: subclasses (e.g. the
    out-projection of ``nn.MultiheadAttention``, tensor-parallel layers) may
    read ``.weight`` directly and would break if replaced.
    """
    patterns = list(skip)
    holders: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(mod_name)
    groups: dict[int, list[str]] = {}
    candidates: set[str] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod) in (nn.Linear, nn.Embedding) and name:
            candidates.add(name)
            groups.setdefault(id(mod.weight), []).append(name)
    result = []
    for wid, names in groups.items():
        if any(_skipped(n, patterns) for n in names):
            continue
        if any(h not in candidates for h in holders[wid]):
            continue  # held by a module we leave float: keep the tie intact
        result.append(names)
    return result


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = 128,
    skip: Iterable[str] = (),
    *,
    symmetric: bool = True,
    compute: str = "dequant",
) -> nn.Module:
    """Replace ``nn.Linear``/``nn.Embedding`` submodules by quantized ones, in place.

    ``skip`` holds module names or glob patterns; a name also skips its
    children. ``symmetric`` applies to int4 (int8 is always symmetric);
    ``compute`` to Linear layers (see the module docstring). Only submodules
    are replaced, so a bare layer is refused. Returns ``model``.
    """
    check_bits(bits, group_size)
    if type(model) in (nn.Linear, nn.Embedding):
        raise ConfigError(
            "quantize_model replaces submodules; wrap a bare layer in nn.Sequential "
            "or use QuantizedLinear.from_float / QuantizedEmbedding.from_float"
        )
    if compute == "int8" and bits != 8:
        raise ConfigError("compute='int8' needs bits=8; use compute='dequant' for int4")
    for names in quantizable_groups(model, skip):
        replace_group(
            model, names, lambda _, m: (_spec_for(m, bits, group_size, symmetric), compute), True
        )
    return model


def replace_group(
    model: nn.Module,
    names: list[str],
    plan: Callable[[str, nn.Module], tuple[QuantSpec, str]],
    from_float: bool,
) -> None:
    """Swap the modules ``names`` (one tied group) for quantized ones sharing one weight.

    ``plan`` gives each float module its spec and compute mode. With
    ``from_float`` the first module is quantized from its weight, otherwise
    buffers are left empty for a state-dict load.
    """
    # A module registered under several names must stay one module.
    replaced: dict[int, QuantizedModule] = {}
    first: QuantizedModule | None = None
    for name in names:
        old = model.get_submodule(name)
        new = replaced.get(id(old))
        if new is None:
            spec, compute = plan(name, old)
            new = build_quantized(old, spec, compute, from_float=from_float and first is None)
            if first is None:
                first = new
            else:
                new.weight_q.share_buffers_of(first.weight_q)
            replaced[id(old)] = new
        _set_submodule(model, name, new)


def build_quantized(
    old: nn.Module, spec: QuantSpec, compute: str, from_float: bool = True
) -> QuantizedModule:
    """The quantized twin of ``old``: quantized from its weight, or empty to be loaded."""
    if isinstance(old, nn.Linear):
        if from_float:
            return QuantizedLinear.from_float(old, spec, compute)
        w = old.weight
        return QuantizedLinear(
            old.in_features,
            old.out_features,
            old.bias is not None,
            spec,
            compute,
            w.dtype,
            w.device,
        )
    if isinstance(old, nn.Embedding):
        if from_float:
            return QuantizedEmbedding.from_float(old, spec)
        w = old.weight
        return QuantizedEmbedding(
            old.num_embeddings, old.embedding_dim, spec, old.padding_idx, w.dtype, w.device
        )
    raise TypeError(f"cannot quantize {type(old).__name__}; only nn.Linear and nn.Embedding")
