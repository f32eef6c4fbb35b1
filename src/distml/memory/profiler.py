"""Training-memory profiler and advisor: per-layer bytes, predicted and measured peak.

:func:`profile_memory` splits a training step's memory into parameters,
gradients, optimizer state (from the optimizer kind: AdamW keeps two fp32
moments, SGD with momentum one buffer, AdamW8bit one byte per moment) and
activations, measured per layer with ``saved_tensors_hooks`` (exactly the
tensors autograd keeps for backward, unique storages). The predicted peak is
the larger of two moments of the step::

    backward start  = params + buffers + optimizer state + batch + model output
                      + saved activations + 2 x the largest saved activation
    optimizer step  = params + buffers + optimizer state + batch + grads
                      + the optimizer's own temporaries

The ``2 x largest`` allowance is the gradient of the biggest activation and
the gradient it produces, alive together while every earlier activation is
still saved; parameter gradients are assumed to fit in memory freed by
activations released before them. Optimizer temporaries follow the update
rule: single-tensor AdamW allocates two tensors of the largest parameter, SGD
with weight decay or Nesterov one, LAMB four, AdamW8bit about six; torch's
multi-tensor (CUDA) AdamW one copy of all parameters. The measured peak is
the allocator's: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
allocation and free events that ``torch.profiler(profile_memory=True)``
records from the CPU allocator, replayed in order. That counts every buffer
kernels allocate (oneDNN reorders, im2col), which a tensor-level tracker
misses, and none of the interpreter noise that an RSS delta carries. Both
peaks add the bytes resident before the step (parameters, buffers, optimizer
state, batch), so they compare like for like; on the zoo's gpt, cnn and
resnet the prediction lands within about 6% on CPU.

The advice (``MemoryReport.advice``) applies the same formula to other
settings: recomputation modes split the recorded activations into checkpoint
units (:class:`~distml.memory.recompute.ActivationProfile`; conservative, up
to ~20% high, because a recomputation and the backward-start transient do not
coincide), bf16 re-records the activations under autocast, 8-bit AdamW swaps
the optimizer terms. Inference is different: a no-grad forward's peak depends
on what kernels keep in flight, which saved tensors do not tell, so fp32
inference is measured once and int8 weights are predicted from it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn

from distml.errors import ConfigError
from distml.memory.optim8bit import AdamW8bit
from distml.memory.precision import autocast
from distml.memory.quantized_modules import quantize_model
from distml.memory.recompute import (
    ActivationProfile,
    ModuleSpec,
    SavedTensorRecord,
    activation_profile,
    apply_recompute,
    as_args,
    flat_tensors,
    preserved_state,
    record_saved_tensors,
    remove_recompute,
    selective_targets,
    storage_key,
)

OPTIMIZER_KINDS = ("adamw", "adam", "sgd", "lars", "lamb", "adamw8bit")
PRECISIONS = ("fp32", "bf16", "fp16")
TargetLossFn = Callable[[Any, Any], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
_TRANSIENT_LARGEST = {"adamw": 2, "adam": 2, "lars": 1, "lamb": 4, "adamw8bit": 6}
_8BIT_BLOCK, _8BIT_MIN = 2048, 4096  # AdamW8bit defaults
_WINDOW = "distml.memory.measured"
_CPU_METHOD = "CPU allocator events (torch.profiler, profile_memory=True)"


@dataclass
class LayerMemory:
    """Bytes one row of the table holds during training."""

    name: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int


@dataclass
class MemoryOption:
    """One setting the advisor considered, with its predicted (and maybe measured) peak."""

    name: str
    settings: dict[str, str]
    predicted_peak_bytes: int
    fits: bool | None = None
    measured_peak_bytes: int | None = None


@dataclass
class MemoryReport:
    """What :func:`profile_memory` found; sizes in bytes."""

    layers: list[LayerMemory]
    optimizer_name: str
    momentum: float
    weight_decay: float
    precision: str
    device: str
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    output_bytes: int
    activation_bytes: int
    activation_transient_bytes: int
    optimizer_transient_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    measured_peak_bytes: int | None = None
    measure_method: str = "not measured"
    budget_bytes: int | None = None
    advice: list[MemoryOption] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        return max(self.backward_peak_bytes, self.optimizer_peak_bytes)

    @property
    def fitting(self) -> list[MemoryOption]:
        return [o for o in self.advice if o.fits]

    def set_budget(self, budget_mb: float | None) -> None:
        """Re-judge every advised option against a new budget (None clears the verdicts)."""
        self.budget_bytes = None if budget_mb is None else int(budget_mb * 1e6)
        for option in self.advice:
            option.fits = (
                None
                if self.budget_bytes is None
                else option.predicted_peak_bytes <= self.budget_bytes
            )


# ------------------------------------------------------------- optimizer accounting
def _check_optimizer(kind: str) -> None:
    if kind not in OPTIMIZER_KINDS:
        raise ConfigError(
            f"optimizer {kind!r} has no memory model; use one of {', '.join(OPTIMIZER_KINDS)}"
        )


def optimizer_state_estimate(params: Iterable[Tensor], kind: str, momentum: float = 0.9) -> int:
    """Bytes of optimizer state after the first step, from the optimizer kind alone.

    Matches what torch's AdamW/SGD, distml's LARS/LAMB and :class:`AdamW8bit`
    allocate: moments in the parameter dtype, a 4-byte step per tensor (8 for
    LAMB), 8-bit codes plus one fp32 absmax per 2048 values for tensors of at
    least 4096 elements under AdamW8bit.
    """
    _check_optimizer(kind)
    total = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        if kind in ("adamw", "adam"):
            total += 2 * n * size + 4
        elif kind == "lamb":
            total += 2 * n * size + 8
        elif kind in ("sgd", "lars"):
            total += n * size if momentum else 0
        elif n >= _8BIT_MIN:
            total += 2 * n + 2 * 4 * -(-n // _8BIT_BLOCK) + 4
        else:
            total += 2 * 4 * n + 4
    return total


def optimizer_transient_estimate(
    params: Sequence[Tensor],
    kind: str,
    *,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    multi_tensor: bool = False,
) -> int:
    """Temporaries of one optimizer step (see the module docstring for the rules)."""
    _check_optimizer(kind)
    if not params:
        return 0
    largest = max(p.numel() * 4 for p in params)
    if kind == "sgd":
        needs_copy = bool(weight_decay) or nesterov
        if not needs_copy:
            return 0
        return sum(p.numel() * 4 for p in params) if multi_tensor else largest
    if kind in ("adamw", "adam") and multi_tensor:
        return sum(p.numel() * 4 for p in params)
    return _TRANSIENT_LARGEST[kind] * largest


def make_optimizer(
    kind: str, params: list[nn.Parameter], momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A stand-in optimizer of ``kind`` for the measured step (lr is tiny: memory only)."""
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return cls(params, lr=1e-6, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-6, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw8bit":
        return AdamW8bit(params, lr=1e-6, weight_decay=weight_decay)
    raise ConfigError(
        f"profile_memory cannot build optimizer {kind!r} itself; pass make_optimizer "
        "(e.g. distml.train.optim.build_optimizer) or measure=False"
    )


# ---------------------------------------------------------------------- measuring
@contextlib.contextmanager
def _autocast(precision: str, device: torch.device) -> Iterator[None]:
    # fp16 holds the same bytes as bf16; its loss scaling adds no activation memory.
    with autocast(precision, device.type):
        yield


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    # Kineto prints a line to fd 2 whenever a profiler starts or stops.
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _unique_bytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key, nbytes = storage_key(t)
        seen[key] = nbytes
    return sum(seen.values())


def peak_allocated(
    fn: Callable[[], Any], device: torch.device, warmup: Callable[[], Any] | None = None
) -> tuple[int, str]:
    """Peak bytes allocated above the level at the start of ``fn()``, and the method.

    ``warmup`` runs first, unmeasured. On CPU it runs inside the profiler as
    well, so that what it allocates and ``fn`` frees is known to the profiler,
    which ignores frees of blocks allocated before it started.
    """
    if device.type == "cuda":
        if warmup is not None:
            warmup()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile, record_function

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        if warmup is not None:
            warmup()
        with record_function(_WINDOW):
            fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("this torch build's profiler does not expose memory events")
    events = list(results.events())
    window = next(e for e in events if e.name() == _WINDOW)
    t0, t1 = window.start_ns(), window.end_ns()
    live, level, peak = 0, None, 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if t > t1:
            break
        if t >= t0 and level is None:
            level = peak = live
        live += nbytes
        if level is not None:
            peak = max(peak, live)
    return (0 if level is None else peak - level), _CPU_METHOD


def measure_step_peak(
    model: nn.Module,
    sample_input: Any,
    targets: Any,
    loss_fn: TargetLossFn,
    optimizer: torch.optim.Optimizer,
    precision: str = "fp32",
) -> tuple[int, str]:
    """Measured peak bytes of one training step of ``model`` (which it trains: pass a copy).

    A warm-up step creates the optimizer state; the second step, with grads
    set to None as the trainer leaves them, is measured. Returns (bytes
    resident before the step + allocation peak during it, method).
    """
    args = as_args(sample_input)
    resident = 0

    def step() -> None:
        with _autocast(precision, _device(model)):
            out = model(*args)
            loss = loss_fn(out, targets)
        loss.backward()  # `out` stays referenced here, as in the trainer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measured() -> None:
        nonlocal resident
        state = flat_tensors([list(s.values()) for s in optimizer.state.values()])
        resident = _unique_bytes(
            [
                *model.parameters(),
                *model.buffers(),
                *state,
                *flat_tensors(args),
                *flat_tensors(targets),
            ]
        )
        step()

    peak, method = peak_allocated(measured, _device(model), warmup=step)
    return resident + peak, method


@torch.no_grad()
def measure_inference_peak(model: nn.Module, sample_input: Any) -> tuple[int, str]:
    """Measured peak bytes of one no-grad forward: resident weights and batch + allocation peak."""
    args = as_args(sample_input)
    resident = _unique_bytes([*model.parameters(), *model.buffers(), *flat_tensors(args)])
    run = lambda: model(*args)  # noqa: E731
    peak, method = peak_allocated(run, _device(model), warmup=run)
    return resident + peak, method


def _device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------- the report
def layer_rows(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, with a ``blocks`` ModuleList expanded into ``blocks.i``."""
    rows: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if name == "blocks" and isinstance(child, nn.ModuleList):
            rows += [(f"blocks.{i}", block) for i, block in enumerate(child)]
        else:
            rows.append((name, child))
    return rows


@dataclass
class _Profile:
    """One recording of the saved tensors with the groups the analyses need."""

    record: SavedTensorRecord
    rows: list[str]
    block_groups: list[int]
    selective_groups: list[int]
    selective_names: list[str]

    def blocks(self) -> ActivationProfile:
        names = [self.rows[g] for g in self.block_groups]
        return activation_profile(self.record, self.block_groups, names)

    def selective(self) -> ActivationProfile:
        return activation_profile(self.record, self.selective_groups, self.selective_names)


def _record(
    model: nn.Module,
    args: tuple[Any, ...],
    targets: Any,
    loss_fn: TargetLossFn,
    precision: str,
    module_types: Sequence[ModuleSpec],
) -> _Profile:
    rows = layer_rows(model)
    groups = [m for _, m in rows]
    block_groups = [i for i, (n, _) in enumerate(rows) if n.startswith("blocks.")]
    selective: list[tuple[str, nn.Module]] = []
    if block_groups:
        with contextlib.suppress(ConfigError):  # blocks without attn/mlp: no selective option
            selective = selective_targets(model, module_types)
    sel_groups = list(range(len(groups), len(groups) + len(selective)))
    groups += [m for _, m in selective]
    device = _device(model)

    def run() -> tuple[Any, Tensor]:
        with _autocast(precision, device):
            out = model(*args)
            return out, loss_fn(out, targets)

    with preserved_state(model), torch.enable_grad():
        record = record_saved_tensors(
            model, groups, run, exclude=[*flat_tensors(args), *flat_tensors(targets)]
        )
    return _Profile(
        record, [n for n, _ in rows], block_groups, sel_groups, [n for n, _ in selective]
    )


def _layers(
    model: nn.Module, prof: _Profile, optimizer_name: str, momentum: float
) -> list[LayerMemory]:
    names = prof.rows
    params: dict[str, list[nn.Parameter]] = {n: [] for n in [*names, "(root)"]}
    for pname, p in model.named_parameters():  # tied weights: counted at their first owner
        owner = next((n for n in names if pname.startswith(n + ".")), "(root)")
        params[owner].append(p)
    acts = dict.fromkeys([*names, "(other)"], 0)
    for key, stack in prof.record.saved.items():
        acts[names[stack[0]] if stack else "(other)"] += prof.record.sizes[key]
    out = []
    for name in [*names, "(root)", "(other)"]:
        ps = params.get(name, [])
        trainable = [p for p in ps if p.requires_grad]
        row = LayerMemory(
            name,
            sum(p.numel() * p.element_size() for p in ps),
            sum(p.numel() * p.element_size() for p in trainable),
            optimizer_state_estimate(trainable, optimizer_name, momentum),
            acts.get(name, 0),
        )
        if name in names or row.param_bytes or row.activation_bytes:
            out.append(row)
    return out


def profile_memory(
    model: nn.Module,
    sample_input: Any,
    targets: Any,
    loss_fn: TargetLossFn,
    optimizer_name: str = "adamw",
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    precision: str = "fp32",
    budget_mb: float | None = None,
    measure: bool = True,
    measure_advice: bool = False,
    make_optimizer_fn: OptimizerFactory | None = None,
    module_types: Sequence[ModuleSpec] = ("attn", "mlp"),
) -> MemoryReport:
    """Per-layer memory of a training step on ``sample_input``, predicted and measured peak.

    ``loss_fn(output, targets)`` is the training loss. The model and the RNG
    are not changed: the analysis runs on a copy with any recomputation removed
    (the advice covers recomputation). ``measure`` runs two real steps on a copy;
    ``measure_advice`` also measures every advised option. ``make_optimizer_fn``
    builds the optimizer for the measured step (needed for lars/lamb).
    """
    _check_optimizer(optimizer_name)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):  # measured steps draw dropout masks
        work = copy.deepcopy(model)
        remove_recompute(work)
        args = as_args(sample_input)
        runner = _Runner(
            work, args, targets, loss_fn, momentum, weight_decay, make_optimizer_fn, module_types
        )
        planner = _Planner(runner, optimizer_name, precision)
        record = planner.profile(precision).record
        opt_bytes, opt_transient = planner.optimizer(optimizer_name)
        backward, step = planner.peaks(precision, "none", optimizer_name)
        report = MemoryReport(
            layers=_layers(work, planner.profile(precision), optimizer_name, momentum),
            optimizer_name=optimizer_name,
            momentum=momentum,
            weight_decay=weight_decay,
            precision=precision,
            device=str(_device(work)),
            param_bytes=planner.params,
            buffer_bytes=planner.buffers,
            grad_bytes=planner.grads,
            optimizer_bytes=opt_bytes,
            batch_bytes=planner.batch,
            output_bytes=record.output_bytes,
            activation_bytes=record.saved_bytes,
            activation_transient_bytes=2 * record.largest_saved_bytes,
            optimizer_transient_bytes=opt_transient,
            backward_peak_bytes=backward,
            optimizer_peak_bytes=step,
        )
        if measure:
            report.measured_peak_bytes, report.measure_method = runner.train(
                optimizer_name, precision, "none"
            )
        report.advice = planner.advise(measure=measure_advice)
        report.set_budget(budget_mb)
        return report


@dataclass
class _Runner:
    """The model, batch and settings; measures a configuration on a fresh copy."""

    model: nn.Module
    args: tuple[Any, ...]
    targets: Any
    loss_fn: TargetLossFn
    momentum: float
    weight_decay: float
    factory: OptimizerFactory | None
    module_types: Sequence[ModuleSpec]

    def train(self, optimizer_name: str, precision: str, recompute: str) -> tuple[int, str]:
        model = copy.deepcopy(self.model)
        mode, _, k = recompute.partition(":")
        apply_recompute(model, mode, every_k=int(k or 2), module_types=self.module_types)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.factory is not None and optimizer_name != "adamw8bit":
            optimizer = self.factory(params)
        else:
            optimizer = make_optimizer(optimizer_name, params, self.momentum, self.weight_decay)
        return measure_step_peak(model, self.args, self.targets, self.loss_fn, optimizer, precision)

    def inference(self, int8: bool) -> tuple[int, str]:
        model = copy.deepcopy(self.model).eval()
        if int8:
            quantize_model(model, 8)
        return measure_inference_peak(model, self.args)


class _Planner:
    """Predicts the peak of a training configuration from recorded activations.

    ``recompute`` is ``none``, ``full``, ``every_k:K`` or ``selective``; the
    recorded activations are split into checkpoint units as
    :class:`~distml.memory.recompute.ActivationProfile` describes.
    """

    def __init__(self, runner: _Runner, optimizer_name: str, precision: str) -> None:
        self.runner = runner
        self.optimizer_name = optimizer_name
        self.precision = precision
        model = runner.model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.params = _unique_bytes(model.parameters())
        self.buffers = _unique_bytes(model.buffers())
        self.grads = sum(p.numel() * p.element_size() for p in self.trainable)
        self.batch = _unique_bytes([*flat_tensors(runner.args), *flat_tensors(runner.targets)])
        self._profiles: dict[str, _Profile] = {}

    def profile(self, precision: str) -> _Profile:
        if precision not in self._profiles:
            r = self.runner
            self._profiles[precision] = _record(
                r.model, r.args, r.targets, r.loss_fn, precision, r.module_types
            )
        return self._profiles[precision]

    def optimizer(self, name: str) -> tuple[int, int]:
        """(state bytes, step temporaries) of optimizer ``name`` over the trainable params."""
        multi_tensor = _device(self.runner.model).type == "cuda"
        return (
            optimizer_state_estimate(self.trainable, name, self.runner.momentum),
            optimizer_transient_estimate(
                self.trainable,
                name,
                weight_decay=self.runner.weight_decay,
                multi_tensor=multi_tensor,
            ),
        )

    def peaks(self, precision: str, recompute: str, optimizer_name: str) -> tuple[int, int]:
        """(backward-start peak, optimizer-step peak), the formula of the module docstring."""
        prof = self.profile(precision)
        record = prof.record
        acts = record.saved_bytes
        mode, _, k = recompute.partition(":")
        if mode in ("full", "every_k"):
            units = prof.blocks()
            acts = units.peak_bytes(range(0, len(units.unit_bytes), int(k or 1)))
        elif mode == "selective":
            acts = prof.selective().peak_bytes(range(len(prof.selective_groups)))
        state, temporaries = self.optimizer(optimizer_name)
        resident = self.params + self.buffers + self.batch + state
        backward = resident + record.output_bytes + acts + 2 * record.largest_saved_bytes
        return backward, resident + self.grads + temporaries

    def advise(self, measure: bool, every_k: int = 2) -> list[MemoryOption]:
        """Recomputation (when there are blocks), bf16, 8-bit AdamW, all of them, inference."""
        prof = self.profile(self.precision)
        opt, prec = self.optimizer_name, self.precision
        adam_like = opt in ("adamw", "adam")
        blocks = bool(prof.block_groups)
        # (name, config overrides, precision, recompute, optimizer)
        candidates: list[tuple[str, dict[str, str], str, str, str]] = [
            ("as configured", {}, prec, "none", opt)
        ]
        if blocks:
            candidates.append(
                (
                    f"recompute every {every_k}",
                    {"memory.recompute": "every_k", "memory.every_k": str(every_k)},
                    prec,
                    f"every_k:{every_k}",
                    opt,
                )
            )
            if prof.selective_groups:
                sel = {"memory.recompute": "selective"}
                candidates.append(("recompute selective", sel, prec, "selective", opt))
            candidates.append(("recompute full", {"memory.recompute": "full"}, prec, "full", opt))
        if prec == "fp32":
            candidates.append(
                ("bf16 autocast", {"schedule.precision": "bf16"}, "bf16", "none", opt)
            )
        if adam_like:
            eight = {"optimizer.name": "adamw8bit"}
            candidates.append(("8-bit AdamW state", eight, prec, "none", "adamw8bit"))
        combo = {"memory.recompute": "full"} if blocks else {}
        combo["schedule.precision"] = "bf16"
        if adam_like:
            combo["optimizer.name"] = "adamw8bit"
        recompute = "full" if blocks else "none"
        candidates.append(
            ("all training savings", combo, "bf16", recompute, "adamw8bit" if adam_like else opt)
        )
        options = []
        for name, settings, precision, recompute, opt_name in candidates:
            option = MemoryOption(name, settings, max(self.peaks(precision, recompute, opt_name)))
            if measure:
                option.measured_peak_bytes = self.runner.train(opt_name, precision, recompute)[0]
            options.append(option)
        return options + _inference_options(
            self.runner.model, self.runner.args, self.batch, self.runner if measure else None
        )


def _inference_options(
    model: nn.Module, args: tuple[Any, ...], batch_bytes: int, runner: _Runner | None
) -> list[MemoryOption]:
    """fp32 inference is measured (one no-grad forward); int8 is predicted from it.

    A no-grad forward's peak depends on which activations kernels keep in
    flight, which saved tensors do not tell, so it is measured once. int8
    swaps the float weight bytes for the quantized ones and needs the largest
    weight dequantized during its layer, when the activations in flight are
    that layer's, so the larger of the two transients counts.
    """
    fp32 = copy.deepcopy(model).eval()
    measured, _ = measure_inference_peak(fp32, args)
    float_weights = _unique_bytes([*fp32.parameters(), *fp32.buffers()])
    in_flight = measured - float_weights - batch_bytes
    dequant = max(
        (m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, (nn.Linear, nn.Embedding))),
        default=0,
    )
    quantized = quantize_model(fp32, 8)
    q_weights = _unique_bytes([*quantized.parameters(), *quantized.buffers()])
    options = [
        MemoryOption(
            "inference fp32", {"mode": "inference"}, measured, measured_peak_bytes=measured
        ),
        MemoryOption(
            "inference int8 weights",
            {"mode": "inference", "memory.quantization.bits": "8"},
            q_weights + batch_bytes + max(in_flight, dequant),
        ),
    ]
    if runner is not None:
        options[1].measured_peak_bytes = runner.inference(int8=True)[0]
    return options


# ----------------------------------------------------------------------- rendering
def format_bytes(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def format_report(report: MemoryReport) -> Table:
    """The per-layer table with totals; the caption gives predicted vs measured peak."""
    table = Table(
        title=f"Training memory ({report.optimizer_name}, {report.precision}, {report.device})"
    )
    for col in ("layer", "params", "grads", "optimizer", "activations"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in report.layers:
        table.add_row(
            row.name,
            format_bytes(row.param_bytes),
            format_bytes(row.grad_bytes),
            format_bytes(row.optimizer_bytes),
            format_bytes(row.activation_bytes),
        )
    table.add_section()
    table.add_row(
        "total",
        format_bytes(report.param_bytes),
        format_bytes(report.grad_bytes),
        format_bytes(report.optimizer_bytes),
        format_bytes(report.activation_bytes),
    )
    # Each extra sits in the column of the memory it resembles.
    table.add_row("buffers", format_bytes(report.buffer_bytes), "", "", "")
    table.add_row(
        "optimizer step temporaries", "", "", format_bytes(report.optimizer_transient_bytes), ""
    )
    for name, value in (
        ("batch (inputs, targets)", report.batch_bytes),
        ("model output held in backward", report.output_bytes),
        ("backward transient (2 x largest activation)", report.activation_transient_bytes),
    ):
        table.add_row(name, "", "", "", format_bytes(value))
    lines = [
        f"predicted peak {format_bytes(report.predicted_peak_bytes)} (backward start "
        f"{format_bytes(report.backward_peak_bytes)}, optimizer step "
        f"{format_bytes(report.optimizer_peak_bytes)})"
    ]
    if report.measured_peak_bytes is not None:
        err = report.predicted_peak_bytes / report.measured_peak_bytes - 1
        lines.append(
            f"measured peak {format_bytes(report.measured_peak_bytes)} "
            f"({report.measure_method}); prediction {err:+.1%}"
        )
    table.caption = "\n".join(lines)
    return table


def format_advice(report: MemoryReport) -> Table:
    """One row per advised option: settings, predicted (and measured) peak, fit."""
    budget = "" if report.budget_bytes is None else f" for {format_bytes(report.budget_bytes)}"
    table = Table(title=f"Memory options{budget}")
    table.add_column("option")
    table.add_column("settings")
    table.add_column("predicted peak", justify="right")
    measured = any(o.measured_peak_bytes is not None for o in report.advice)
    if measured:
        table.add_column("measured peak", justify="right")
    if report.budget_bytes is not None:
        table.add_column("fits")
    for o in report.advice:
        cells = [
            o.name,
            " ".join(f"{k}={v}" for k, v in o.settings.items()) or "-",
            format_bytes(o.predicted_peak_bytes),
        ]
        if measured:
            cells.append(
                "" if o.measured_peak_bytes is None else format_bytes(o.measured_peak_bytes)
            )
        if report.budget_bytes is not None:
            cells.append("yes" if o.fits else "no")
        table.add_row(*cells)
    return table
