"""Activation recomputation (checkpointing) plans applied to a model's ``blocks``.

:func:`apply_recompute` wraps blocks, or submodules inside blocks, in a
:class:`CheckpointWrapper` that runs them under non-reentrant
``torch.utils.checkpoint``: their intermediate activations are dropped after
the forward and recomputed during the backward. Modes: ``none``, ``full``
(every block), ``every_k`` (blocks 0, k, 2k, ...), ``selective`` (named
submodules such as ``attn``/``mlp`` inside each block) and ``auto``, which
measures every block's saved activations and forward time on a sample batch
and checkpoints the cheapest set of blocks that fits an activation budget.
Wrapping keeps ``state_dict`` keys unchanged (``named_parameters`` gain an
``inner`` segment), composes with DDP (wrap before DDP) and leaves BatchNorm
running statistics updated once per step.

The activation budget of ``auto`` counts activation memory only: the peak
bytes of tensors saved for backward (unique storages; parameters, buffers and
the input batch excluded). That is the larger of the saved activations at the
end of the forward and, for each checkpointed block, the moment the backward
recomputes it: later blocks are released by then, so what is left is the
activations outside the blocks, those of the kept earlier blocks and its own.
Parameters, gradients and optimizer state are outside this budget; see
:mod:`distml.memory.profiler` for the whole step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distml.errors import ConfigError

RECOMPUTE_MODES = ("none", "full", "every_k", "selective", "auto")
ModuleSpec = str | type[nn.Module]
LossFn = Callable[[Any], Tensor]
_INNER = "inner"
log = logging.getLogger("distml.memory")
_DP_CELLS = 1 << 14  # byte-grid resolution of the auto planner


class CheckpointWrapper(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing when grads are on.

    The inner module is registered as ``inner`` but ``state_dict``/``load_state_dict``
    drop that segment, so checkpoints match the unwrapped model; attribute lookups
    fall through to ``inner`` (``block.attn`` still works). During recomputation the
    inner buffers are restored afterwards, so running statistics (BatchNorm) are
    updated once per forward, as without checkpointing.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_state_dict_post_hook(_drop_inner_keys)
        self.register_load_state_dict_pre_hook(_add_inner_keys)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        calls = 0

        def run(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self.inner(*a, **kw)
            with _restore_buffers(self.inner):
                return self.inner(*a, **kw)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == _INNER:
                raise
            return getattr(self.inner, name)


def _drop_inner_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    inner = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        # Metadata keys carry no trailing dot: "blocks.0.inner.attn" -> "blocks.0.attn".
        outer = prefix[:-1] if prefix else ""
        inner_meta = outer + "." + _INNER if outer else _INNER
        for key in [k for k in meta if k == inner_meta or k.startswith(inner_meta + ".")]:
            meta[outer + key[len(inner_meta) :]] = meta.pop(key)


def _add_inner_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    inner = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


@contextlib.contextmanager
def _restore_buffers(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in saved:
                # Copy only what changed: a copy bumps the version counter of a
                # buffer that the recomputed graph may have saved.
                if not torch.equal(buf, old):
                    buf.copy_(old)


def remove_recompute(model: nn.Module) -> int:
    """Unwrap every :class:`CheckpointWrapper` inside ``model`` in place; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CheckpointWrapper):
                setattr(parent, name, child.inner)
                count += 1
    return count


@contextlib.contextmanager
def recompute_unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without its :class:`CheckpointWrapper`s for the duration, then wrapped again.

    ``state_dict`` keys hide the wrappers, but ``named_parameters`` and
    ``named_modules`` show an ``inner`` segment; code that matches parameters
    or modules to state-dict keys by name (sharded checkpoints) must see the
    plain names. Run no forward pass inside.
    """
    swapped = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, CheckpointWrapper)
    ]
    for parent, name, wrapper in swapped:
        setattr(parent, name, wrapper.inner)
    try:
        yield model
    finally:
        # Reverse order puts nested wrappers back inside out.
        for parent, name, wrapper in reversed(swapped):
            setattr(parent, name, wrapper)


# ----------------------------------------------------------- activation accounting
def storage_key(t: Tensor) -> tuple[tuple[str, int], int]:
    """(key, bytes) of the storage behind ``t``; views of one storage share a key."""
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse or storage-less subclasses
        return ("id", id(t)), t.numel() * t.element_size()


def flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flat_tensors(item)]
    return []


@dataclass
class SavedTensorRecord:
    """Tensors saved for backward during one forward (+ loss), by storage.

    ``sizes`` maps every storage key (saved ones, then group inputs) to bytes;
    ``saved`` lists saved keys in first-saved order with the groups that were
    running then (outermost first); ``by_group[i]`` holds the keys saved while
    group ``i`` ran, ``inputs[i]`` the keys of its tensor arguments and
    ``outside`` the keys saved (also) while no group ran.
    Parameters, buffers and the ``exclude`` tensors (the batch) are left out.
    """

    sizes: dict[tuple[str, int], int] = field(default_factory=dict)
    saved: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    by_group: list[set[tuple[str, int]]] = field(default_factory=list)
    inputs: list[set[tuple[str, int]]] = field(default_factory=list)
    outside: set[tuple[str, int]] = field(default_factory=set)
    output_bytes: int = 0  # model output not itself saved (held by the caller in backward)

    @property
    def saved_bytes(self) -> int:
        return sum(self.sizes[k] for k in self.saved)

    @property
    def largest_saved_bytes(self) -> int:
        return max((self.sizes[k] for k in self.saved), default=0)


def record_saved_tensors(
    model: nn.Module,
    groups: Sequence[nn.Module],
    run: Callable[[], tuple[Any, Tensor]],
    exclude: Sequence[Tensor] = (),
) -> SavedTensorRecord:
    """Run ``run() -> (model output, loss)`` once and account the tensors it saves.

    Uses ``torch.autograd.graph.saved_tensors_hooks``: what autograd keeps for
    backward is exactly what the pack hook sees (checkpointed modules show only
    their inputs), so the result is the model's activation memory, not an estimate.
    """
    rec = SavedTensorRecord(by_group=[set() for _ in groups], inputs=[set() for _ in groups])
    skip = {storage_key(t)[0] for t in [*model.parameters(), *model.buffers(), *exclude]}
    stack: list[int] = []
    held: list[Tensor] = []  # keeps group inputs alive so no address is reused meanwhile

    def pack(t: Tensor) -> Tensor:
        key, nbytes = storage_key(t)
        if key in skip or nbytes == 0:
            return t
        rec.sizes[key] = nbytes
        rec.saved.setdefault(key, tuple(stack))
        for g in stack:
            rec.by_group[g].add(key)
        if not stack:
            rec.outside.add(key)
        return t

    def make_hooks(i: int) -> tuple[Any, Any]:
        def pre(_: nn.Module, args: Any, kwargs: Any) -> None:
            stack.append(i)
            for t in flat_tensors((args, kwargs)):
                key, nbytes = storage_key(t)
                if key not in skip and nbytes:
                    rec.sizes[key] = nbytes
                    rec.inputs[i].add(key)
                    held.append(t)

        def post(_: nn.Module, args: Any, output: Any) -> None:
            stack.pop()

        return pre, post

    handles = []
    try:
        for i, module in enumerate(groups):
            pre, post = make_hooks(i)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output, loss = run()
        for t in flat_tensors(output):
            key, nbytes = storage_key(t)
            if key not in rec.saved and key not in skip:
                rec.output_bytes += nbytes
        del output, loss
    finally:
        for h in handles:
            h.remove()
    return rec


@dataclass
class ActivationProfile:
    """Activation bytes of a model split into checkpointable units and the rest.

    ``unit_bytes[i]`` are the bytes saved only inside unit ``i`` (freed by
    checkpointing it); ``base_bytes`` are kept whatever is checkpointed: saved
    outside the units, unit inputs (a checkpoint keeps them) and storages shared
    by several units. The additive split is exact when each unit saves its own
    input, as the blocks of the zoo models do, and an upper bound otherwise.
    """

    unit_names: list[str]
    unit_bytes: list[int]
    base_bytes: int
    largest_saved_bytes: int
    output_bytes: int
    unit_seconds: list[float] = field(default_factory=list)

    def saved_bytes(self, checkpointed: Collection[int] = ()) -> int:
        """Saved activations at the end of the forward."""
        kept = sum(b for i, b in enumerate(self.unit_bytes) if i not in checkpointed)
        return self.base_bytes + kept

    def peak_bytes(self, checkpointed: Collection[int] = ()) -> int:
        """Activation peak over forward and backward with ``checkpointed`` units.

        The larger of the forward's saved bytes and, for each checkpointed unit,
        the moment it is recomputed in backward: by then every later unit's
        activations are released, so base + kept earlier units + its own remain.
        Units must run once each, in order (true of ``blocks``).
        """
        chosen = set(checkpointed)
        peak = self.saved_bytes(chosen)
        earlier = 0
        for i, nbytes in enumerate(self.unit_bytes):
            if i in chosen:
                peak = max(peak, self.base_bytes + earlier + nbytes)
            else:
                earlier += nbytes
        return peak


def activation_profile(
    record: SavedTensorRecord, units: Sequence[int], names: Sequence[str]
) -> ActivationProfile:
    """Split ``record`` into the groups ``units`` (indices into its groups) and the rest."""
    owners: dict[tuple[str, int], int] = {}
    for u in units:
        for key in record.by_group[u]:
            owners[key] = owners.get(key, 0) + 1
    inputs = set().union(*(record.inputs[u] for u in units)) if units else set()
    shared = {k for k, n in owners.items() if n > 1}
    # Saved outside the units (even if a unit saved it too): checkpointing keeps it.
    outside = record.outside | (set(record.saved) - set(owners))
    base = outside | inputs | shared
    unit_bytes = [sum(record.sizes[k] for k in record.by_group[u] - base) for u in units]
    return ActivationProfile(
        unit_names=list(names),
        unit_bytes=unit_bytes,
        base_bytes=sum(record.sizes[k] for k in base),
        largest_saved_bytes=record.largest_saved_bytes,
        output_bytes=record.output_bytes,
    )


def _sum_loss(output: Any) -> Tensor:
    parts = [t.float().sum() for t in flat_tensors(output) if t.is_floating_point()]
    return torch.stack(parts).sum()


def as_args(sample_input: Any) -> tuple[Any, ...]:
    return tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a scratch pass without side effects: RNG, buffers and grads come back as they were."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buf, old in buffers:
                buf.copy_(old)
        for p, g in grads:
            p.grad = g


def time_modules(
    modules: Sequence[nn.Module], run: Callable[[], Any], repeats: int = 2
) -> list[float]:
    """Forward seconds of each module (min over ``repeats`` runs of ``run``, after a warm-up)."""
    best = [float("inf")] * len(modules)
    starts = [0.0] * len(modules)
    cuda = any(p.is_cuda for m in modules for p in m.parameters())

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def make(i: int) -> tuple[Any, Any]:
        def pre(_: nn.Module, args: Any) -> None:
            starts[i] = clock()

        def post(_: nn.Module, args: Any, output: Any) -> None:
            best[i] = min(best[i], clock() - starts[i])

        return pre, post

    handles = []
    try:
        run()  # warm-up: first calls pay for allocation and kernel selection
        for i, m in enumerate(modules):
            pre, post = make(i)
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        for _ in range(repeats):
            run()
    finally:
        for h in handles:
            h.remove()
    return best


# ------------------------------------------------------------------ unit selection
def _blocks(model: nn.Module, mode: str) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(
            f"memory.recompute={mode} needs a model with a non-empty `blocks` ModuleList; "
            f"{type(model).__name__} has none, so use memory.recompute=none"
        )
    return blocks


def _matches(module: nn.Module, spec: ModuleSpec) -> bool:
    return not isinstance(spec, str) and isinstance(module, spec)


def selective_targets(
    model: nn.Module, module_types: Sequence[ModuleSpec]
) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the submodules of each block named or typed in ``module_types``.

    A string matches a direct child attribute of a block (``"attn"``), a class
    matches any descendant (outermost matches only, so nothing is wrapped twice).
    """
    blocks = _blocks(model, "selective")
    found: list[tuple[str, nn.Module]] = []
    for i, block in enumerate(blocks):
        inner = block.inner if isinstance(block, CheckpointWrapper) else block
        chosen: list[str] = []
        for name, module in inner.named_modules():
            if not name or any(name.startswith(c + ".") for c in chosen):
                continue
            direct = "." not in name and name in [s for s in module_types if isinstance(s, str)]
            if direct or any(_matches(module, s) for s in module_types):
                chosen.append(name)
                found.append((f"blocks.{i}.{name}", module))
    if not found:
        wanted = ", ".join(s if isinstance(s, str) else s.__name__ for s in module_types)
        raise ConfigError(
            f"memory.recompute=selective matched no submodule ({wanted}) inside model.blocks; "
            "set memory.recompute_modules to attribute names or classes the blocks contain"
        )
    return found


def choose_checkpointed(
    unit_bytes: Sequence[int], unit_seconds: Sequence[float], base_bytes: int, budget_bytes: int
) -> list[int]:
    """Units to checkpoint so :meth:`ActivationProfile.peak_bytes` fits at least recompute time.

    A dynamic program over the units in order whose state is the bytes kept
    so far: keeping unit ``i`` adds its bytes, checkpointing it needs base +
    kept so far + its bytes to fit (its recomputation) and costs its forward
    time. Bytes round up and the budget rounds down on a byte grid of at most
    ``_DP_CELLS`` cells, so the answer never exceeds the budget. Raises
    :class:`ConfigError` when even full recomputation (peak base + largest
    unit, the least any choice can reach) does not fit.
    """
    n = len(unit_bytes)
    if base_bytes + sum(unit_bytes) <= budget_bytes:
        return []
    smallest = base_bytes + max(unit_bytes)
    if smallest > budget_bytes:
        raise ConfigError(
            f"memory.budget_mb={budget_bytes / 1e6:g} cannot be met even with full "
            f"recomputation; the smallest feasible budget is {_ceil_mb(smallest)} MB"
        )
    # Exact when the sizes share a divisor that makes the grid small enough (usual:
    # equal blocks, power-of-two tensors); otherwise a grid that only errs safe.
    cell = math.gcd(*unit_bytes) or 1
    if sum(unit_bytes) // cell > _DP_CELLS:
        cell = -(-sum(unit_bytes) // _DP_CELLS)
    w = [-(-b // cell) for b in unit_bytes]
    cap = min((budget_bytes - base_bytes) // cell, sum(w))
    # A tiny bonus per kept unit breaks ties between equally fast plans toward fewer wraps.
    bonus = 1e-9 * (1.0 + max(unit_seconds, default=0.0))
    value = np.full(cap + 1, -np.inf)
    value[0] = 0.0
    kept_at = np.zeros((n, cap + 1), dtype=bool)
    for i in range(n):
        nxt = np.full(cap + 1, -np.inf)
        if w[i] <= cap:
            fits = np.arange(cap + 1) + w[i] <= cap
            nxt[fits] = value[fits]  # checkpoint: its recomputation must fit too
            keep = np.full(cap + 1, -np.inf)
            keep[w[i] :] = value[: cap + 1 - w[i]] + unit_seconds[i] + bonus
            kept_at[i] = keep > nxt
            nxt = np.maximum(nxt, keep)
        value = nxt
    if not np.isfinite(value).any():
        return list(range(n))  # grid rounding hid the exact fit of full recomputation
    state = int(np.argmax(value))
    chosen = []
    for i in range(n - 1, -1, -1):
        if kept_at[i, state]:
            state -= w[i]
        else:
            chosen.append(i)
    return sorted(chosen)


def _ceil_mb(nbytes: int) -> str:
    return f"{np.ceil(nbytes / 1e5) / 10:.1f}"


# ----------------------------------------------------------------------- the plan
@dataclass
class RecomputePlan:
    """What :func:`apply_recompute` wrapped, with auto mode's prediction."""

    mode: str
    wrapped: list[str]
    num_blocks: int
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None  # activation peak incl. the recomputed unit
    predicted_saved_bytes: int | None = None  # saved activations at the end of the forward
    recompute_seconds: float | None = None  # forward time of the checkpointed units
    profile: ActivationProfile | None = None

    def summary(self) -> str:
        """One log line: the mode, what was wrapped and, for auto, the predicted peak."""
        what = ", ".join(self.wrapped) if self.wrapped else "nothing"
        line = f"recompute={self.mode}: checkpointing {len(self.wrapped)} module(s) ({what})"
        if self.predicted_peak_bytes is not None and self.budget_bytes is not None:
            line += (
                f"; predicted activation peak {self.predicted_peak_bytes / 1e6:.2f} MB "
                f"of budget {self.budget_bytes / 1e6:.2f} MB"
            )
        return line


def apply_recompute(
    model: nn.Module,
    mode: str,
    *,
    every_k: int = 2,
    module_types: Sequence[ModuleSpec] = ("attn", "mlp"),
    budget_mb: float | None = None,
    sample_input: Any = None,
    loss_fn: LossFn | None = None,
    sync_group: Any = None,
) -> RecomputePlan:
    """Wrap ``model``'s blocks (or submodules) for recomputation in place; returns the plan.

    Call before DDP or other wrappers. Any earlier wrapping is undone first.
    ``auto`` needs ``budget_mb`` (activation memory, see the module docstring)
    and ``sample_input`` (a tensor or a tuple of forward arguments); ``loss_fn``
    maps the model output to a scalar (default: its sum) so the loss's saved
    tensors count too. With ``sync_group`` (a process group every member of
    which calls this) the measured block times are averaged over the group, so
    all replicas checkpoint the same blocks. Use :func:`measure_saved_bytes`
    to check the result.
    """
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(
            f"memory.recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}"
        )
    remove_recompute(model)
    if mode == "none":
        blocks = getattr(model, "blocks", None)
        return RecomputePlan(mode, [], len(blocks) if isinstance(blocks, nn.ModuleList) else 0)
    blocks = _blocks(model, mode)
    if mode == "selective":
        targets = selective_targets(model, module_types)
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, CheckpointWrapper(module))
        return RecomputePlan(mode, [n for n, _ in targets], len(blocks))
    if mode == "full":
        chosen = list(range(len(blocks)))
    elif mode == "every_k":
        if every_k < 1:
            raise ConfigError(f"memory.every_k must be >= 1, got {every_k}")
        chosen = list(range(0, len(blocks), every_k))
    else:
        return _apply_auto(model, blocks, budget_mb, sample_input, loss_fn, sync_group)
    _wrap_blocks(blocks, chosen)
    return RecomputePlan(mode, [f"blocks.{i}" for i in chosen], len(blocks))


def _wrap_blocks(blocks: nn.ModuleList, indices: Sequence[int]) -> None:
    for i in indices:
        blocks[i] = CheckpointWrapper(blocks[i])


def _apply_auto(
    model: nn.Module,
    blocks: nn.ModuleList,
    budget_mb: float | None,
    sample_input: Any,
    loss_fn: LossFn | None,
    sync_group: Any,
) -> RecomputePlan:
    if budget_mb is None or budget_mb <= 0 or sample_input is None:
        raise ConfigError(
            "memory.recompute=auto needs memory.budget_mb > 0 and a sample batch to profile; "
            "set memory.budget_mb or pick full/every_k/selective"
        )
    profile = profile_blocks(model, sample_input, loss_fn)
    if sync_group is not None:
        profile.unit_seconds = _mean_over_group(profile.unit_seconds, model, sync_group)
    budget = int(budget_mb * 1e6)
    chosen = choose_checkpointed(
        profile.unit_bytes, profile.unit_seconds, profile.base_bytes, budget
    )
    _wrap_blocks(blocks, chosen)
    plan = RecomputePlan(
        "auto",
        [f"blocks.{i}" for i in chosen],
        len(blocks),
        budget_bytes=budget,
        predicted_peak_bytes=profile.peak_bytes(chosen),
        predicted_saved_bytes=profile.saved_bytes(chosen),
        recompute_seconds=sum(profile.unit_seconds[i] for i in chosen),
        profile=profile,
    )
    log.info(plan.summary())
    return plan


def _mean_over_group(seconds: list[float], model: nn.Module, group: Any) -> list[float]:
    import torch.distributed as dist

    # nccl reduces device tensors only; gloo takes CPU ones.
    device = next(model.parameters()).device if dist.get_backend(group) == "nccl" else "cpu"
    times = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(times, group=group)
    return (times / dist.get_world_size(group)).tolist()


def profile_blocks(
    model: nn.Module, sample_input: Any, loss_fn: LossFn | None = None
) -> ActivationProfile:
    """Per-block saved-activation bytes and forward seconds on ``sample_input``."""
    blocks = list(_blocks(model, "auto"))
    args = as_args(sample_input)
    loss = loss_fn or _sum_loss

    def run() -> tuple[Any, Tensor]:
        out = model(*args)
        return out, loss(out)

    with preserved_state(model), torch.enable_grad():
        record = record_saved_tensors(model, blocks, run, exclude=flat_tensors(args))
        profile = activation_profile(
            record, range(len(blocks)), [f"blocks.{i}" for i in range(len(blocks))]
        )
        profile.unit_seconds = time_modules(blocks, run)
    return profile


def measure_saved_bytes(model: nn.Module, sample_input: Any, loss_fn: LossFn | None = None) -> int:
    """Bytes saved for backward by one forward (+ loss) of ``model`` as it is now wrapped.

    This is the activation memory held between forward and backward (unique
    storages; parameters, buffers and the input excluded); it does not include
    the transient recomputation during backward.
    """
    args = as_args(sample_input)
    loss = loss_fn or _sum_loss

    def run() -> tuple[Any, Tensor]:
        out = model(*args)
        return out, loss(out)

    with preserved_state(model), torch.enable_grad():
        return record_saved_tensors(model, [], run, exclude=flat_tensors(args)).saved_bytes
