"""QuantizedLinear / QuantizedEmbedding and quantize_model: bounds, replacement, ties, accuracy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from distml.errors import ConfigError
from distml.memory import QuantizedEmbedding, QuantizedLinear, quantize_model
from distml.memory.quantization import int4_error_bound, int8_error_bound
from distml.memory.quantized_modules import QuantSpec


class TiedLM(nn.Module):
    """A GPT-shaped toy: token embedding tied to the output head."""

    def __init__(self, vocab: int = 50, dim: int = 40) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.lm_head(self.ln(h + self.block(h)))


def _weight_bound(mod: QuantizedLinear | QuantizedEmbedding) -> torch.Tensor:
    wq = mod.weight_q
    if wq.layout is None:
        return int8_error_bound(wq.scale, wq.cols)
    return int4_error_bound(wq.scale, wq.layout)


@pytest.mark.parametrize(
    "spec", [QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_output_within_analytic_bound(spec: QuantSpec, bias: bool) -> None:
    linear = nn.Linear(70, 33, bias=bias)
    qlin = QuantizedLinear.from_float(linear, spec)
    x = torch.randn(4, 5, 70)
    with torch.no_grad():
        y, y_ref = qlin(x), linear(x)
        # Exactly F.linear with the dequantized weight...
        expected = nn.functional.linear(x, qlin.weight, linear.bias)
        # ...so |y - y_ref| <= sum_j |x_j| * bound_ij (triangle inequality).
        bound = x.abs() @ _weight_bound(qlin).T + 1e-5
    assert y.shape == (4, 5, 33)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert bool(((y - y_ref).abs() <= bound).all())
    assert float((y - y_ref).abs().max()) > 0  # it really is quantized


def test_int8_compute_within_activation_rounding_bound() -> None:
    linear = nn.Linear(96, 40)
    deq = QuantizedLinear.from_float(linear, QuantSpec(8, 0))
    fast = QuantizedLinear.from_float(linear, QuantSpec(8, 0), compute="int8")
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        y_deq, y_int = deq(x), fast(x)
        # Each activation is within sx/2 of its int8 code: |dy| <= sx/2 * sum_j |w_ij|.
        sx = x.abs().amax(dim=-1, keepdim=True) / 127
        bound = sx / 2 * deq.weight.abs().sum(dim=1) + 1e-4
    assert bool(((y_int - y_deq).abs() <= bound).all())
    assert not torch.equal(y_int, y_deq)


@pytest.mark.parametrize("spec", [QuantSpec(8, 0), QuantSpec(4, 16, symmetric=False)])
def test_quantized_embedding_looks_up_dequantized_rows(spec: QuantSpec) -> None:
    emb = nn.Embedding(30, 24)
    qemb = QuantizedEmbedding.from_float(emb, spec)
    ids = torch.tensor([[0, 29, 5], [5, 5, 1]])
    out = qemb(ids)
    assert torch.equal(out, qemb.weight[ids])
    assert bool(((out - emb(ids)).abs() <= _weight_bound(qemb)[ids] + 1e-6).all())


def test_quantize_model_replaces_in_place_and_respects_skip() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 2)
    )
    out = quantize_model(model, bits=8, skip=["1", "2"])
    assert out is model
    assert [type(m).__name__ for m in (model[0], model[1][0], model[1][1], model[2])] == [
        "QuantizedLinear",
        "Linear",
        "Linear",
        "Linear",
    ]
    quantize_model(model, bits=4, skip=["1.*"])
    assert isinstance(model[2], QuantizedLinear) and isinstance(model[1][0], nn.Linear)
    assert model[2].weight_q.spec.bits == 4


def test_tied_embedding_and_head_are_quantized_once_and_share_buffers() -> None:
    model = TiedLM()
    ids = torch.randint(0, 50, (2, 9))
    quantize_model(model, bits=4, group_size=16)
    assert isinstance(model.wte, QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert model.wte.weight_q.qweight is model.lm_head.weight_q.qweight
    assert model.wte.weight_q.scale is model.lm_head.weight_q.scale
    with torch.no_grad():
        logits = model(ids)
        ref = TiedLM()  # same architecture, weights replaced by the dequantized ones
        ref.load_state_dict({k: v for k, v in _float_view(model).items()}, strict=True)
        torch.testing.assert_close(logits, ref(ids), rtol=0, atol=1e-5)


def _float_view(model: TiedLM) -> dict[str, torch.Tensor]:
    """The float state dict a TiedLM would have with the quantized weights dequantized."""
    out: dict[str, torch.Tensor] = {}
    for name in ("wte", "lm_head", "block.0", "block.2"):
        mod = model.get_submodule(name)
        out[f"{name}.weight"] = mod.weight
        if getattr(mod, "bias", None) is not None:
            out[f"{name}.bias"] = mod.bias
    out["ln.weight"], out["ln.bias"] = model.ln.weight, model.ln.bias
    return out


def test_skipping_one_member_of_a_tie_keeps_the_whole_tie_float() -> None:
    model = TiedLM()
    quantize_model(model, bits=8, skip=["lm_head"])
    assert type(model.wte) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.wte.weight is model.lm_head.weight
    assert isinstance(model.block[0], QuantizedLinear)


def test_attention_internals_and_subclasses_are_left_alone() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2), "proj": nn.Linear(16, 16)})
    quantize_model(model, bits=8)
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model["proj"], QuantizedLinear)
    x = torch.randn(5, 1, 16)
    model["attn"](x, x, x)  # still runs


def test_bad_bits_and_compute_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^quantization bits must be 8 or 4, got 3; set "):
        quantize_model(nn.Linear(4, 4), bits=3)
    with pytest.raises(ConfigError, match=r"^quantize_model replaces submodules; wrap a bare"):
        quantize_model(nn.Linear(4, 4), bits=8)
    with pytest.raises(ConfigError, match=r"compute='int8' needs bits=8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), bits=4, compute="int8")


def test_digits_accuracy_int8_within_one_point_and_int4_reported(
    digits: tuple[torch.Tensor, ...],
    trained_mlp: nn.Module,
    digits_accuracy: Callable[..., float],
) -> None:
    fp32 = digits_accuracy(trained_mlp, digits)
    assert fp32 >= 95.0
    results = {"fp32": fp32}
    for label, kwargs in {
        "int8": {"bits": 8},
        "int8-int_mm": {"bits": 8, "compute": "int8"},
        "int4-sym-g128": {"bits": 4},
        "int4-asym-g128": {"bits": 4, "symmetric": False},
    }.items():
        model = quantize_model(copy.deepcopy(trained_mlp), **kwargs)  # type: ignore[arg-type]
        assert isinstance(model[0], QuantizedLinear)
        results[label] = digits_accuracy(model, digits)
    print("digits test accuracy:", {k: round(v, 2) for k, v in results.items()})
    assert results["int8"] >= fp32 - 1.0
    assert results["int8-int_mm"] >= fp32 - 1.0
    # int4 is reported; the assert only guards against a broken kernel.
    assert min(results["int4-sym-g128"], results["int4-asym-g128"]) >= fp32 - 5.0
