"""AdamW8bit: code maps, block quantization, agreement with torch AdamW, memory, resume."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

from distml.errors import ConfigError
from distml.memory import AdamW8bit, optimizer_state_bytes
from distml.memory.optim8bit import (
    dequantize_blockwise,
    dynamic_code_map,
    linear_code_map,
    quantize_blockwise,
)


def test_code_maps_are_sorted_bounded_and_exact_at_zero_and_one() -> None:
    for build, signed, size in [
        (dynamic_code_map, True, 255),
        (dynamic_code_map, False, 256),
        (linear_code_map, True, 255),
        (linear_code_map, False, 256),
    ]:
        code = build(signed)
        assert code.numel() == size and code.dtype == torch.float32
        assert bool((code.diff() > 0).all())
        assert float(code[-1]) == 1.0 and 0.0 in code.tolist()
        assert float(code[0]) == (-1.0 if signed else 0.0)
    dyn = dynamic_code_map(False)
    # Non-uniform: tiny values keep codes that a uniform map would round to 0.
    assert float(dyn[1]) < 1e-6 < 1 / 255


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("build", [dynamic_code_map, linear_code_map])
def test_blockwise_quantization_picks_the_nearest_code(
    build: Callable[[bool], torch.Tensor], signed: bool
) -> None:
    code = build(signed)
    x = torch.randn(3, 1000) * torch.logspace(-4, 0, 1000)  # ragged blocks, wide range
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, code, block_size=256)
    assert codes.dtype == torch.uint8 and codes.numel() == 3000 and absmax.numel() == 12
    deq = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    # Brute force: the nearest code to each block-normalized value.
    flat = torch.nn.functional.pad(x.reshape(-1), (0, 72)).view(-1, 256)
    normed = (flat / flat.abs().amax(dim=1, keepdim=True)).reshape(-1)[:3000]
    best = (normed[:, None] - code[None, :]).abs().min(dim=1).values
    chosen = (normed - code[codes.long()]).abs()
    assert bool((chosen <= best + 1e-7).all())
    assert torch.equal(deq.reshape(-1), code[codes.long()] * absmax.repeat_interleave(256)[:3000])


def _grads(shapes: list[tuple[int, ...]], steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _run(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]
) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("quant", ["dynamic", "linear"])
def test_steps_track_torch_adamw_on_the_same_gradients(quant: str) -> None:
    shapes = [(128, 96), (96,)]  # one 8-bit tensor, one small fp32-state tensor
    init = [torch.randn(s) for s in shapes]
    ref = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, **kw)  # type: ignore[arg-type]
    opt = AdamW8bit(ours, block_size=512, quant=quant, **kw)  # type: ignore[arg-type]
    grads = _grads(shapes, 6)
    # Step 1 starts from zero moments, so it is exactly torch's step.
    _run(opt_ref, ref, grads[:1])
    _run(opt, ours, grads[:1])
    assert all(torch.equal(a, b) for a, b in zip(ref, ours, strict=True))
    # Later steps read quantized moments: close, within a small part of a step
    # on average; the uniform code is coarser for small moments.
    _run(opt_ref, ref, grads[1:])
    _run(opt, ours, grads[1:])
    diff = (ref[0] - ours[0]).detach().abs() / kw["lr"]  # type: ignore[operator]
    max_tol, mean_tol = (0.5, 0.05) if quant == "dynamic" else (3.0, 0.1)
    assert float(diff.max()) < max_tol and float(diff.mean()) < mean_tol
    assert float(diff.max()) > 0  # the moments really are quantized
    st = opt.state[ours[0]]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_absmax"].numel() == 24
    # Small tensor: fp32 moments, same math as torch, so it stays identical.
    assert torch.equal(ref[1], ours[1])
    assert torch.equal(opt.state[ours[1]]["exp_avg_sq"], opt_ref.state[ref[1]]["exp_avg_sq"])


def test_state_bytes_at_least_3_5x_smaller_than_adamw() -> None:
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    models = [model, copy.deepcopy(model)]
    opts = [torch.optim.AdamW(models[0].parameters()), AdamW8bit(models[1].parameters())]
    x = torch.randn(8, 512)
    for m, opt in zip(models, opts, strict=True):
        m(x).square().mean().backward()
        opt.step()
    full, small = (optimizer_state_bytes(o) for o in opts)
    n = sum(p.numel() for p in model.parameters())
    assert full == 8 * n + 4 * 4  # two fp32 moments + four fp32 step counters
    # Two uint8 codes per weight + one fp32 absmax per 2048; biases keep fp32 moments.
    weights = 2 * 512 * 512
    assert small == 2 * weights + 2 * 4 * (weights // 2048) + 8 * 2 * 512 + 4 * 4
    assert full / small >= 3.5


def test_trains_digits_mlp_to_95_percent(
    digits: tuple[torch.Tensor, ...],
    make_mlp: Callable[..., nn.Module],
    train_digits: Callable[..., nn.Module],
    digits_accuracy: Callable[..., float],
) -> None:
    model = make_mlp(256)
    opt = AdamW8bit(model.parameters(), lr=3e-3)
    train_digits(model, opt, digits, epochs=20)
    assert "exp_avg_codes" in opt.state[model[0].weight]  # the 64x256 layer ran 8-bit
    acc = digits_accuracy(model.eval(), digits)
    print(f"AdamW8bit digits test accuracy: {acc:.2f}")
    assert acc >= 95.0


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 64, generator=gen)
    return model(x).square().mean()


def test_state_dict_roundtrip_continues_identically() -> None:
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))
    opt = AdamW8bit(model.parameters(), lr=1e-2, block_size=1024, min_8bit_size=1000)
    for step in range(4):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and plain values only
    resumed = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))
    resumed.load_state_dict(saved["model"])
    opt2 = AdamW8bit(resumed.parameters(), lr=1.0, quant="linear")  # groups come from the file
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["quant"] == "dynamic" and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.state[resumed[0].weight]["exp_avg_codes"].dtype == torch.uint8
    for step in range(4, 8):
        for m, o in ((model, opt), (resumed, opt2)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True)
    )


def test_bf16_params_keep_their_dtype_and_track_fp32() -> None:
    p32 = torch.randn(64, 80, requires_grad=True)
    p16 = p32.detach().to(torch.bfloat16).requires_grad_()
    o32, o16 = AdamW8bit([p32], lr=1e-2), AdamW8bit([p16], lr=1e-2)
    for g in _grads([(64, 80)], 3):
        p32.grad, p16.grad = g[0], g[0].to(torch.bfloat16)
        o32.step()
        o16.step()
    assert p16.dtype == torch.bfloat16
    torch.testing.assert_close(p16.float(), p32.detach(), atol=0.05, rtol=0.02)


def test_bad_settings_are_config_errors() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match=r"quant must be one of \('dynamic', 'linear'\), got 'x'"):
        AdamW8bit(p, quant="x")
    with pytest.raises(ConfigError, match=r"betas must be in \[0, 1\)"):
        AdamW8bit(p, betas=(0.9, 1.0))


def test_state_bytes_counts_each_storage_once() -> None:
    shared = torch.zeros(10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(10))], lr=0.1, momentum=0.9)
    opt.state[opt.param_groups[0]["params"][0]] = {"a": shared, "b": shared, "n": 3}
    assert optimizer_state_bytes(opt) == 40
