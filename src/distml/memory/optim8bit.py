"""AdamW with 8-bit block-wise quantized moments, and a byte count of optimizer state.

:class:`AdamW8bit` follows ``torch.optim.AdamW`` (decoupled weight decay, bias
correction) but keeps both moments as one byte per element plus one fp32
absmax per block of ``block_size`` elements, about 2 bytes per parameter
instead of 8. Each step dequantizes a tensor's moments to fp32, updates them
with the fresh gradient, applies the parameter update from those fp32 values
and re-quantizes for storage, so rounding only affects what is carried to the
next step. ``quant="dynamic"`` maps block-normalized values to the nearest of
a non-uniform dynamic-exponent code (a decade per exponent, more fraction
steps for larger magnitudes: 255 signed codes for the first moment, 256
unsigned for the second), which keeps the small second-moment values that a
uniform ``quant="linear"`` code rounds to zero. Tensors with fewer than
``min_8bit_size`` (4096) elements keep fp32 moments, like bitsandbytes: their
memory is negligible and biases/norm scales are the most rounding-sensitive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from distml.errors import ConfigError, UserError

QUANT_MODES = ("dynamic", "linear")


def dynamic_code_map(signed: bool) -> Tensor:
    """Sorted dynamic-exponent code values in ``[-1, 1]`` (signed) or ``[0, 1]``.

    Magnitude bits ``b`` (7 signed, 8 unsigned) give ``b`` decades; decade
    ``k`` covers ``(10^-(k+1), 10^-k]`` with ``2^(b-1-k)`` evenly spaced values,
    so each extra exponent step halves the fraction resolution. 1.0 is a code,
    so every block's absmax element is stored exactly.
    """
    bits = 7 if signed else 8
    mags = [
        torch.linspace(0.1, 1.0, 2 ** (bits - 1 - k) + 1, dtype=torch.float64)[1:] * 10.0**-k
        for k in range(bits)
    ]
    pos = torch.cat(mags)
    parts = [-pos, torch.zeros(1, dtype=torch.float64), pos] if signed else [torch.zeros(1), pos]
    return torch.sort(torch.cat([t.double() for t in parts])).values.float()


def linear_code_map(signed: bool) -> Tensor:
    """Uniform codes: ``k/127`` for ``k`` in ``[-127, 127]``, or ``k/255`` for ``k in [0, 255]``."""
    if signed:
        return torch.arange(-127, 128, dtype=torch.float64).div(127).float()
    return torch.arange(0, 256, dtype=torch.float64).div(255).float()


def quantize_blockwise(
    x: Tensor, code: Tensor, block_size: int, round_up: bool = False
) -> tuple[Tensor, Tensor]:
    """Flat ``uint8`` indices into ``code`` and the fp32 absmax of each block of ``x``.

    Values go to the nearest code, or with ``round_up`` to the smallest code
    not below them.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # Nearest code: bucketize against the midpoints between neighbouring codes.
    edges = code if round_up else (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(blocks / safe[:, None], edges, out_int32=True)
    if round_up:
        idx.clamp_(max=code.numel() - 1)  # x/absmax can exceed 1.0 by a rounding error
    return idx.to(torch.uint8).view(-1)[:n].clone(), absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, code: Tensor, block_size: int, shape: torch.Size
) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: an fp32 tensor of ``shape``."""
    n = codes.numel()
    vals = F.pad(code[codes.long()], (0, (-n) % block_size)).view(-1, block_size)
    return (vals * absmax[:, None]).view(-1)[:n].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored 8-bit block-wise quantized (see module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        block_size: int = 2048,
        quant: str = "dynamic",
        min_8bit_size: int = 4096,
    ) -> None:
        if quant not in QUANT_MODES:
            raise ConfigError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ConfigError("lr, eps and weight_decay must be >= 0 for AdamW8bit")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            quant=quant,
            min_8bit_size=min_8bit_size,
        )
        super().__init__(params, defaults)
        self._code_cache: dict[tuple[str, bool, torch.device], Tensor] = {}

    def _code(self, quant: str, signed: bool, device: torch.device) -> Tensor:
        key = (quant, signed, device)
        if key not in self._code_cache:
            build = dynamic_code_map if quant == "dynamic" else linear_code_map
            self._code_cache[key] = build(signed).to(device)
        return self._code_cache[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UserError("AdamW8bit does not support sparse gradients; use dense ones")
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        quantized = p.numel() >= group["min_8bit_size"]
        grad = p.grad
        assert grad is not None
        g = grad.float()
        if not state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        t = float(state["step"].item())
        if quantized:
            m, v = self._load_moments(p, state, group)
        else:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            m, v = state["exp_avg"], state["exp_avg_sq"]
        # Same operation order as torch.optim.AdamW's single-tensor path.
        p32 = p if p.dtype == torch.float32 else p.float()
        p32.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p32.addcdiv_(m, denom, value=-step_size)
        if p32 is not p:
            p.copy_(p32)
        if quantized:
            self._store_moments(m, v, state, group)

    def _load_moments(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        if "exp_avg_codes" not in state:
            zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return zeros, zeros.clone()
        bs, quant = group["block_size"], group["quant"]
        m = dequantize_blockwise(
            state["exp_avg_codes"],
            state["exp_avg_absmax"],
            self._code(quant, True, p.device),
            bs,
            p.shape,
        )
        v = dequantize_blockwise(
            state["exp_avg_sq_codes"],
            state["exp_avg_sq_absmax"],
            self._code(quant, False, p.device),
            bs,
            p.shape,
        )
        return m, v

    def _store_moments(
        self, m: Tensor, v: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        bs, quant = group["block_size"], group["quant"]
        state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(
            m, self._code(quant, True, m.device), bs
        )
        # A uniform code would round most small second moments to 0, making
        # m / sqrt(v) explode on the next step; rounding up keeps updates bounded.
        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(
            v, self._code(quant, False, v.device), bs, round_up=quant == "linear"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps each state tensor's dtype (torch would cast uint8 codes)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)


class _HasState(Protocol):
    @property
    def state(self) -> Mapping[Any, Mapping[str, Any]]: ...


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | _HasState) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for param_state in optimizer.state.values():
        for value in param_state.values():
            if isinstance(value, Tensor):
                ptr = value.untyped_storage().data_ptr()
                if ptr in seen and value.numel() > 0:
                    continue
                seen.add(ptr)
                total += value.untyped_storage().nbytes()
    return total
