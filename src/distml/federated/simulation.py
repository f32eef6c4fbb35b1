"""Single-machine federated simulation: many virtual clients, one process.

:func:`simulate` runs rounds of sample -> local SGD -> aggregate -> evaluate
with any :class:`~distml.federated.strategies.Strategy`. In ``mode="vmap"`` the
round's clients train together: their parameters are stacked along a new
leading dimension, one ``torch.vmap`` of ``functional_call`` runs every
client's mini-batch forward in a single call per local step, and one plain
autograd pass gives every client's gradient (clients are independent, so the
gradient of the summed losses w.r.t. client k's slice is client k's gradient;
this is about twice as fast as ``vmap`` over ``torch.func.grad`` on CPU).
Clients hold different amounts of data: each step carries per-sample weights
that are ``1/|batch|`` on a client's valid rows (a short last batch has fewer)
and 0 on padding and on clients that have run all of their own steps, whose
gradient is then exactly 0 so their weights stay put (plain SGD, no momentum
or weight decay, makes that exact). ``mode="sequential"`` is the reference:
one client after another with an ``nn.Module`` and ``torch.optim.SGD`` over the
same batches from the same per-(seed, round) generator, so the two modes agree
to float rounding. The loss is cross-entropy on classification logits; models
with BatchNorm (running statistics) are not supported in vmap mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distml.errors import ConfigError
from distml.federated.parameters import (
    Parameters,
    get_parameters,
    num_bytes,
    parameter_names,
    set_parameters,
    subtract,
    unflatten,
)
from distml.federated.secagg import secure_sum, weighted_input, weighted_mean_from_sum
from distml.federated.strategies.base import FitResult, Strategy, sample_clients, weighted_metrics

MODES = ("vmap", "sequential")


@dataclass
class RoundRecord:
    """What one round did and how the global model scored after it."""

    round: int
    clients: list[int]
    train_loss: float
    test_loss: float | None
    test_accuracy: float | None
    bytes_down: int
    bytes_up: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    """Per-round records plus the final global model."""

    rounds: list[RoundRecord]
    parameters: Parameters

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready rounds (the parameters are left out)."""
        return {"rounds": [asdict(r) for r in self.rounds]}

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].test_accuracy if self.rounds else None


@dataclass(frozen=True)
class ClientPlan:
    """One client's local run: a row of training-set indices per SGD step, ``-1`` = padding."""

    client_id: int
    batches: np.ndarray
    num_examples: int
    noise_seed: int

    def batch(self, step: int) -> torch.Tensor:
        row = self.batches[step]
        return torch.from_numpy(row[row >= 0])


def round_plans(
    partitions: Sequence[np.ndarray],
    selected: Sequence[int],
    local_epochs: int,
    batch_size: int,
    seed: int,
    server_round: int,
) -> list[ClientPlan]:
    """Every selected client's shuffled mini-batches for all local epochs.

    One generator per (seed, round) draws, client by client in ``selected``
    order, a permutation per epoch; an epoch's last batch may be short. Both
    simulation modes train from these plans, which is what makes them agree.
    """
    rng = np.random.default_rng([seed, server_round])
    m, epochs = len(selected), local_epochs
    sizes = np.array([len(partitions[c]) for c in selected], dtype=np.int64)
    steps_per_epoch = -(-sizes // batch_size)
    max_steps = int((steps_per_epoch * epochs).max())
    # One segment per (client, epoch); a stable sort on (segment, random key) shuffles every
    # segment at once, which keeps this cheap for many clients.
    seg_len = np.repeat(sizes, epochs)
    seg_id = np.repeat(np.arange(m * epochs), seg_len)
    order = np.lexsort((rng.random(len(seg_id)), seg_id))
    source = np.concatenate([np.tile(np.asarray(partitions[c]), epochs) for c in selected])
    client = np.repeat(np.arange(m), epochs)
    epoch = np.tile(np.arange(epochs), m)
    seg_dest = client * max_steps * batch_size + epoch * np.repeat(steps_per_epoch, epochs) * (
        batch_size
    )
    seg_first = np.cumsum(seg_len) - seg_len
    dest = np.repeat(seg_dest - seg_first, seg_len) + np.arange(len(seg_id))
    flat = np.full(m * max_steps * batch_size, -1, dtype=np.int64)
    flat[dest] = source[order]
    padded = flat.reshape(m, max_steps, batch_size)
    noise_seeds = rng.integers(0, 2**62, size=m)
    return [
        ClientPlan(
            int(c),
            padded[k, : int(steps_per_epoch[k]) * epochs],
            int(sizes[k]),
            int(noise_seeds[k]),
        )
        for k, c in enumerate(selected)
    ]


class _Trainer:
    """Local training of a round's clients from one global model, in either mode."""

    def __init__(
        self, model: nn.Module, strategy: Strategy, x: torch.Tensor, y: torch.Tensor, lr: float
    ) -> None:
        self.model = model.train()
        self.strategy = strategy
        self.x = x
        self.y = y
        self.lr = lr
        self.names = parameter_names(model)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # Tied weights appear under several state_dict names; train the first, mirror the rest.
        first: dict[int, str] = {}
        self.alias: dict[str, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.alias[n] = first.setdefault(id(p), n)

    def sequential(
        self, plans: Sequence[ClientPlan], global_params: Parameters
    ) -> list[tuple[Parameters, float]]:
        """Reference path, one client at a time with ``nn.Module`` and ``torch.optim.SGD``."""
        out = []
        global_by_name = dict(zip(self.names, global_params, strict=True))
        global_trainable = [global_by_name[n] for n in self.trainable]
        for plan in plans:
            set_parameters(self.model, global_params)
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=self.lr)
            correction = self._correction(plan.client_id, global_params)
            losses = []
            for step in range(len(plan.batches)):
                batch = plan.batch(step)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self.x[batch]), self.y[batch])
                term = self.strategy.client_loss_term(params, global_trainable)
                if term is not None:
                    loss = loss + term
                if correction is not None:
                    linear = sum((p * c).sum() for p, c in zip(params, correction, strict=True))
                    loss = loss + torch.as_tensor(linear)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            update = subtract(list(self.model.state_dict().values()), global_params)
            out.append((update, float(np.mean(losses))))
        return out

    def _correction(self, client_id: int, global_params: Parameters) -> Parameters | None:
        """The strategy's gradient correction of one client, on the trainable tensors only."""
        full = self.strategy.client_correction(client_id, global_params)
        if full is None:
            return None
        by_name = dict(zip(self.names, full, strict=True))
        return [by_name[n].to(global_params[0].device) for n in self.trainable]

    def vmapped(
        self, plans: Sequence[ClientPlan], global_params: Parameters
    ) -> list[tuple[Parameters, float]]:
        """All clients at once: stacked parameters, one vmapped forward and backward per step."""
        m = len(plans)
        by_name = dict(zip(self.names, global_params, strict=True))
        trainable = self.trainable
        stacked = {
            n: by_name[n].unsqueeze(0).expand(m, *by_name[n].shape).clone() for n in trainable
        }
        frozen = {n: t for n, t in by_name.items() if self.alias.get(n, n) not in stacked}
        global_trainable = tuple(by_name[n] for n in trainable)
        device = self.x.device
        idx, mask, active = (t.to(device) for t in _pad_plans(plans))
        model, strategy = self.model, self.strategy
        aliases = {n: p for n, p in self.alias.items() if n != p and p in stacked}

        def forward(params: dict[str, torch.Tensor], bx: torch.Tensor) -> torch.Tensor:
            # Aliases are passed explicitly, which lets functional_call skip its tie check.
            tied = {n: params[p] for n, p in aliases.items()}
            return functional_call(model, (params, tied, frozen), (bx,), tie_weights=False)

        def loss_term(params: dict[str, torch.Tensor]) -> torch.Tensor:
            term = strategy.client_loss_term([params[n] for n in trainable], global_trainable)
            return torch.zeros(()) if term is None else term

        has_term = strategy.client_loss_term(list(global_trainable), global_trainable) is not None
        client_corr = [self._correction(p.client_id, global_params) for p in plans]
        corrections = None
        if all(c is not None for c in client_corr):
            corrections = [torch.stack(ts) for ts in zip(*client_corr, strict=True)]
        batched_forward = torch.vmap(forward, randomness="different")
        batched_term = torch.vmap(loss_term)
        leaves = [stacked[n].requires_grad_() for n in trainable]
        # weight[s, k, i] = 1/|batch| on a valid row of an active client, else 0: the
        # weighted sum is each client's mean batch loss, and exactly 0 once it is done.
        dtype = global_trainable[0].dtype if global_trainable else mask.dtype
        weight = (mask / mask.sum(dim=2, keepdim=True).clamp_min(1.0)).to(dtype)
        step_losses = []
        ones = torch.ones(m, dtype=weight.dtype, device=device)
        for s in range(idx.shape[0]):
            rows = idx[s]
            # Forward under vmap, backward with plain autograd: clients are independent, so
            # the gradient of the summed loss w.r.t. client k's slice is client k's gradient
            # (one autograd pass is much cheaper than vmap over torch.func.grad).
            logits = batched_forward(stacked, self.x[rows])
            per_sample = F.cross_entropy(
                logits.flatten(0, 1), self.y[rows].flatten(), reduction="none"
            )
            losses = (per_sample.view(rows.shape) * weight[s]).sum(dim=1)
            if has_term:
                losses = losses + batched_term(stacked) * active[s].to(losses.dtype)
            if corrections is not None:
                # <theta_k, corr_k> per client: its gradient w.r.t. theta_k is corr_k.
                linear = sum(
                    (leaf * c).flatten(1).sum(1)
                    for leaf, c in zip(leaves, corrections, strict=True)
                )
                losses = losses + torch.as_tensor(linear) * active[s].to(losses.dtype)
            grads = torch.autograd.grad(losses, leaves, grad_outputs=ones)
            with torch.no_grad():
                torch._foreach_add_(leaves, grads, alpha=-self.lr)
            step_losses.append(losses.detach())
        steps = active.sum(dim=0).clamp_min(1.0).double()
        mean_loss = (torch.stack(step_losses).double().sum(dim=0) / steps).tolist()
        with torch.no_grad():
            per_client = {n: torch.unbind(stacked[n] - by_name[n]) for n in trainable}
        zeros = {n: torch.zeros_like(t, dtype=_float(t)) for n, t in frozen.items()}
        columns = [
            per_client[self.alias.get(n, n)] if n not in zeros else (zeros[n],) * m
            for n in self.names
        ]
        return [([col[k] for col in columns], mean_loss[k]) for k in range(m)]


def _float(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _pad_plans(plans: Sequence[ClientPlan]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(steps, clients, batch) indices (padding points at row 0), sample mask, active flags."""
    steps = max(len(p.batches) for p in plans)
    width = plans[0].batches.shape[1]
    idx = np.full((steps, len(plans), width), -1, dtype=np.int64)
    for k, plan in enumerate(plans):
        idx[: len(plan.batches), k] = plan.batches
    valid = torch.from_numpy(idx >= 0)
    mask = valid.to(torch.get_default_dtype())
    return torch.from_numpy(idx).clamp_min(0), mask, valid.any(dim=2).to(mask.dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    params: Parameters,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4096,
    names: Sequence[str] | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` with ``params`` on ``(x, y)``, in eval mode."""
    state = dict(zip(names or parameter_names(model), params, strict=True))
    if model.training:
        model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = functional_call(model, state, (x[start : start + batch_size],))
        target = y[start : start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss / max(len(x), 1), correct / max(len(x), 1)


def simulate(
    model_fn: Callable[[], nn.Module],
    train: tuple[torch.Tensor, torch.Tensor],
    partitions: Sequence[np.ndarray | torch.Tensor],
    strategy: Strategy,
    *,
    rounds: int,
    clients_per_round: int | None = None,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    mode: str = "vmap",
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    transform_results: Callable[[FitResult], FitResult] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    secure_aggregation: int | None = None,
) -> History:
    """Federated training of ``model_fn()`` over ``partitions`` of ``train``; returns the history.

    ``clients_per_round`` overrides the strategy's ``fraction_fit`` sampling;
    ``lr`` defaults to the strategy's ``fit_config()["lr"]`` (FedOpt's ``eta_l``)
    or 0.05. ``transform_results`` sees every client result before aggregation
    (to model attackers or lossy uplinks); ``on_round`` is called after each round.
    ``secure_aggregation=t`` sums the round's example-weighted updates with the
    secure aggregation protocol (threshold ``t``) so the strategy only sees their
    mean; it needs a strategy that aggregates by the weighted mean (FedAvg family),
    and ``bytes_up`` then counts the masked uint64 vectors.
    """
    _check_args(partitions, rounds, clients_per_round, local_epochs, batch_size, mode)
    if secure_aggregation is not None and not strategy.linear_aggregation:
        raise ConfigError(
            f"strategy {strategy.name!r} needs individual client updates, which secure "
            "aggregation hides; use a FedAvg-family strategy (fedavg, fedprox, fedavgm, fedadam, "
            "fedyogi, fedadagrad) or turn secure aggregation off"
        )
    x, y = train
    if len(x) != len(y) or max(int(np.max(np.asarray(p))) for p in partitions) >= len(x):
        raise ConfigError(
            f"train data has {len(x)} inputs and {len(y)} labels and partitions must index "
            "into it; build partitions from the same training set"
        )
    torch.manual_seed(seed)
    model = model_fn()
    if mode == "vmap" and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ConfigError(
            "vmap simulation cannot train BatchNorm running statistics; use GroupNorm/LayerNorm "
            "or mode='sequential'"
        )
    eval_model = copy.deepcopy(model).eval()
    global_params = get_parameters(model)
    parts = [np.asarray(p, dtype=np.int64) for p in partitions]
    client_ids = list(range(len(parts)))
    rng = np.random.default_rng(seed)
    trainer = _Trainer(model, strategy, x, y, lr or 0.0)
    history: list[RoundRecord] = []
    transforms_updates = type(strategy).client_update is not Strategy.client_update
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        if clients_per_round is None:
            selected = strategy.configure_fit(server_round, client_ids, rng)
        else:
            selected = sample_clients(client_ids, clients_per_round, rng)
            strategy.record_sampling(len(selected), len(client_ids))
        if secure_aggregation is not None and not 2 <= secure_aggregation <= len(selected):
            raise ConfigError(
                f"secure_aggregation threshold must be in 2..{len(selected)} (clients per "
                f"round), got {secure_aggregation}"
            )
        if not selected:
            raise ConfigError(
                f"strategy {strategy.name!r} sampled no clients from {len(client_ids)}; "
                "lower its min_fit_clients or pass clients_per_round"
            )
        round_lr = (
            lr if lr is not None else float(strategy.fit_config(server_round).get("lr", 0.05))
        )
        trainer.lr = round_lr
        plans = round_plans(parts, selected, local_epochs, batch_size, seed, server_round)
        trained = (trainer.vmapped if mode == "vmap" else trainer.sequential)(plans, global_params)
        results = []
        for plan, (update, loss) in zip(plans, trained, strict=True):
            if transforms_updates:
                update = strategy.client_update(
                    update, torch.Generator().manual_seed(plan.noise_seed)
                )
            metrics = {"train_loss": loss, "local_steps": float(len(plan.batches)), "lr": round_lr}
            result = FitResult(plan.client_id, update, plan.num_examples, metrics, is_update=True)
            results.append(transform_results(result) if transform_results else result)
        train_loss = weighted_metrics(
            [r.metrics for r in results], [r.num_examples for r in results]
        ).get("train_loss", float("nan"))
        bytes_up = sum(num_bytes(r.parameters) for r in results)
        if secure_aggregation is not None:
            results = [_secure_mean(results, secure_aggregation, global_params)]
            bytes_up = 8 * (_dim(global_params) + 1) * len(selected)
        global_params = strategy.aggregate_fit(server_round, results, global_params)
        test_loss = test_acc = None
        if test is not None:
            test_loss, test_acc = evaluate(eval_model, global_params, *test, names=trainer.names)
        record = RoundRecord(
            round=server_round,
            clients=selected,
            train_loss=train_loss,
            test_loss=test_loss,
            test_accuracy=test_acc,
            bytes_down=num_bytes(global_params) * len(selected),
            bytes_up=bytes_up,
            seconds=time.perf_counter() - start,
            metrics=strategy.round_metrics(),
        )
        history.append(record)
        if on_round is not None:
            on_round(record)
    return History(history, global_params)


def _dim(params: Parameters) -> int:
    return sum(p.numel() for p in params)


def _secure_mean(results: Sequence[FitResult], threshold: int, current: Parameters) -> FitResult:
    """The example-weighted mean update of ``results``, computed through secure aggregation."""
    inputs = {r.client_id: weighted_input(r.update(current), r.num_examples) for r in results}
    total, _ = secure_sum(inputs, threshold)
    mean, count = weighted_mean_from_sum(total)
    update = [u.to(c.device) for u, c in zip(unflatten(mean, current), current, strict=True)]
    return FitResult(-1, update, round(count), is_update=True)


def _check_args(
    partitions: Sequence[Any],
    rounds: int,
    clients_per_round: int | None,
    local_epochs: int,
    batch_size: int,
    mode: str,
) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown simulation mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not partitions or any(len(p) == 0 for p in partitions):
        raise ConfigError("every client partition must hold at least one sample")
    if rounds < 1 or local_epochs < 1 or batch_size < 1:
        raise ConfigError(
            f"rounds, local_epochs and batch_size must be >= 1, got {rounds}, {local_epochs}, "
            f"{batch_size}"
        )
    if clients_per_round is not None and not 1 <= clients_per_round <= len(partitions):
        raise ConfigError(
            f"clients_per_round must be in 1..{len(partitions)} (the number of clients), "
            f"got {clients_per_round}"
        )
