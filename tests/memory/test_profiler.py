"""Memory profiler: predicted peak within 15% of the allocator's measurement, a table that
adds up, optimizer-state bytes equal to real optimizers', and advice that honours a budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from distml.memory import AdamW8bit, optimizer_state_bytes
from distml.memory.profiler import (
    MemoryReport,
    format_advice,
    format_report,
    optimizer_state_estimate,
    peak_allocated,
    profile_memory,
)
from distml.models.cnn import CNN, CNNConfig
from distml.models.gpt import GPT, GPTConfig

Case = tuple[nn.Module, torch.Tensor, torch.Tensor]


def _gpt() -> Case:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, block_size=32, n_layer=4, n_head=4, n_embd=64, dropout=0.1)
    return GPT(cfg), torch.randint(128, (4, 32)), torch.randint(128, (4, 32))


def _cnn() -> Case:
    torch.manual_seed(0)
    return CNN(CNNConfig()), torch.rand(64, 1, 8, 8), torch.randint(10, (64,))


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _profile(case: Case, optimizer: str, **kwargs: object) -> MemoryReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test one
    try:
        model, x, y = case
        return profile_memory(model, x, y, _ce, optimizer, **kwargs)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt_report() -> MemoryReport:
    return _profile(_gpt(), "adamw")


def test_cpu_measurement_replays_allocator_events_exactly() -> None:
    def work() -> None:
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(500_000)  # + 2 MB: the peak
        del a
        c = torch.ones(250_000)  # 3 MB live now
        del b, c

    peak, method = peak_allocated(work, torch.device("cpu"), warmup=work)
    assert peak == 6_000_000
    assert "profiler" in method


@pytest.mark.parametrize("make", [_gpt, _cnn], ids=["gpt", "cnn"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_predicted_peak_is_within_15_percent_of_measured(make, optimizer: str) -> None:
    report = _profile(make(), optimizer)
    assert report.measured_peak_bytes is not None
    error = report.predicted_peak_bytes / report.measured_peak_bytes - 1
    assert abs(error) <= 0.15, (report.predicted_peak_bytes, report.measured_peak_bytes)


def test_profiling_leaves_model_and_rng_untouched() -> None:
    model, x, y = _gpt()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    profile_memory(model, x, y, _ce, "adamw", measure=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_layer_table_adds_up(gpt_report: MemoryReport) -> None:
    layers = {row.name: row for row in gpt_report.layers}
    assert [f"blocks.{i}" for i in range(4)] == [n for n in layers if n.startswith("blocks.")]
    assert sum(r.param_bytes for r in layers.values()) == gpt_report.param_bytes
    assert sum(r.grad_bytes for r in layers.values()) == gpt_report.grad_bytes
    assert sum(r.optimizer_bytes for r in layers.values()) == gpt_report.optimizer_bytes
    assert sum(r.activation_bytes for r in layers.values()) == gpt_report.activation_bytes
    # Identical blocks save identical activations; AdamW keeps two moments per weight.
    assert len({layers[f"blocks.{i}"].activation_bytes for i in range(4)}) == 1
    assert layers["blocks.0"].activation_bytes > 0
    n_tensors = len(list(_gpt()[0].blocks[0].parameters()))
    assert layers["blocks.0"].optimizer_bytes == 2 * layers["blocks.0"].param_bytes + 4 * n_tensors
    assert gpt_report.predicted_peak_bytes == max(
        gpt_report.backward_peak_bytes, gpt_report.optimizer_peak_bytes
    )


@pytest.mark.parametrize(
    ("kind", "momentum"), [("adamw", 0.9), ("sgd", 0.9), ("sgd", 0.0), ("adamw8bit", 0.9)]
)
def test_optimizer_state_estimate_matches_a_real_step(kind: str, momentum: float) -> None:
    model, x, y = _gpt()
    params = list(model.parameters())
    if kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-3)
    elif kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=momentum)
    else:
        opt = AdamW8bit(params, lr=1e-3)
    _ce(model(x), y).backward()
    opt.step()
    assert optimizer_state_bytes(opt) == optimizer_state_estimate(params, kind, momentum)


def test_advice_follows_the_budget(gpt_report: MemoryReport) -> None:
    options = {o.name: o for o in gpt_report.advice}
    configured = options["as configured"].predicted_peak_bytes
    assert configured == gpt_report.predicted_peak_bytes
    for cheaper in ("recompute full", "recompute selective", "bf16 autocast", "8-bit AdamW state"):
        assert options[cheaper].predicted_peak_bytes < configured, cheaper
    assert options["inference int8 weights"].predicted_peak_bytes < (
        options["inference fp32"].predicted_peak_bytes
    )

    gpt_report.set_budget(10 * configured / 1e6)
    assert [o.name for o in gpt_report.fitting] == list(options)
    gpt_report.set_budget((configured - 1) / 1e6)
    fitting = {o.name for o in gpt_report.fitting}
    assert "as configured" not in fitting
    assert {"recompute full", "all training savings"} <= fitting
    gpt_report.set_budget(0.001)
    assert gpt_report.fitting == []


def test_advised_options_measure_close_to_their_prediction() -> None:
    report = _profile(_cnn(), "adamw", measure_advice=True, budget_mb=1.0)
    assert {o.name for o in report.advice} >= {"bf16 autocast", "8-bit AdamW state"}
    for option in report.advice:
        assert option.measured_peak_bytes is not None
        error = option.predicted_peak_bytes / option.measured_peak_bytes - 1
        assert abs(error) <= 0.15, (option.name, error)


def test_format_report_and_advice_render(gpt_report: MemoryReport) -> None:
    gpt_report.set_budget(1000.0)
    console = Console(record=True, width=200)
    console.print(format_report(gpt_report))
    console.print(format_advice(gpt_report))
    text = console.export_text()
    for needle in ("blocks.3", "lm_head", "predicted peak", "measured peak", "recompute full"):
        assert needle in text
    assert "fits" in text and "yes" in text
