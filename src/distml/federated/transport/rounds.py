"""The server's round protocol, independent of gRPC: sample, publish tasks, collect, aggregate.

:class:`RoundCoordinator` runs rounds in the caller's thread while transport
handlers (one thread per connected client) call :meth:`~RoundCoordinator.next_task`
to long-poll for work and :meth:`~RoundCoordinator.submit` to hand results
back. A fit phase samples clients through the strategy's ``configure_fit``,
waits until all of them answered or the round deadline passed, and completes
when at least ``min_fit_clients`` answered; otherwise it is retried with a new
sample, up to ``max_round_retries`` times. A sampled client that did not
answer is skipped by later samples until it polls again, so a dead client
costs one deadline, not one per round. After aggregation the server
evaluates the model on its own test split, clients evaluate it on theirs,
and the round is persisted (checkpoint, SQLite row, a line in metrics.jsonl)
before the next one starts. With ``secagg_threshold`` set, a fit phase
collects no individual results: clients upload through the secure
aggregation steps of :class:`~distml.federated.transport.secure_round.SecureFitRound`
and the strategy gets the unmasked example-weighted mean (or, under DP, the
sum of the clients' clipped updates).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from distml.errors import UserError, WorkerFailure
from distml.federated.config import FederatedSection
from distml.federated.parameters import Parameters, parameter_names, unflatten
from distml.federated.privacy import DifferentialPrivacy
from distml.federated.secagg import SecAggError
from distml.federated.simulation import evaluate
from distml.federated.strategies import EvaluateResult, FitResult, Strategy, weighted_metrics
from distml.federated.transport.secure_round import SecureFitRound
from distml.federated.transport.store import ServerStore, load_strategy_state, strategy_state
from distml.federated.transport.wire import encode_parameters, make_encoder, sha256_hex

log = logging.getLogger("distml.federated")

WAIT = "wait"
FINISH = "finish"


class NotJoined(UserError):
    """A client polled or submitted before calling Join (gRPC FAILED_PRECONDITION)."""


class StaleTask(UserError):
    """A result for a task that is not open any more (gRPC FAILED_PRECONDITION)."""


class _Stopped(Exception):
    """The server is shutting down; the round in progress is dropped."""


@dataclass(frozen=True)
class Task:
    """Work for one client: train (``fit``) or evaluate the global model in ``payload``."""

    task_id: str
    kind: str
    server_round: int
    client: str
    config: dict[str, Any]
    payload: bytes
    sha256: str
    codec: str


@dataclass
class _Client:
    id: int
    name: str
    last_seen: float
    polling: int = 0
    #: Left its last task unanswered: not sampled again until it polls.
    missed: bool = False
    finished: bool = False


@dataclass
class _Phase:
    tasks: dict[str, Task]
    results: dict[str, FitResult | EvaluateResult] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    secure: SecureFitRound | None = None


#: Entries a client appends to its secure-aggregation vector after the weighted update:
#: weight * train loss, example count, weight.
SECURE_EXTRA = 3


class RoundCoordinator:
    """Round state shared between the round loop and the transport's handler threads."""

    def __init__(
        self,
        *,
        settings: FederatedSection,
        strategy: Strategy,
        model: nn.Module,
        store: ServerStore,
        seed: int = 0,
        test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        run_id: str = "run",
    ) -> None:
        self.settings = settings
        self.strategy = strategy
        self.store = store
        self.seed = seed
        self.test_data = test_data
        self.run_id = run_id
        self.eval_model = model.eval()
        self.names = parameter_names(model)
        state = model.state_dict()
        self.shapes = [tuple(state[n].shape) for n in self.names]
        self.params: Parameters = [t.detach().clone() for t in state.values()]
        self._cond = threading.Condition()
        self._clients: dict[str, _Client] = {}
        self._phase: _Phase | None = None
        self._stopping = False
        self._finished = False
        self.current_round = 0

    # -- called by transport handlers -----------------------------------------

    def join(self, name: str) -> int:
        """Register ``name`` (persistently) and mark it available."""
        client_id = self.store.register_client(name)
        with self._cond:
            client = self._client_locked(name, client_id)
            client.last_seen = time.monotonic()
            client.missed = False
            self._cond.notify_all()
        return client_id

    def next_task(
        self, name: str, timeout: float, is_active: Callable[[], bool] = lambda: True
    ) -> Task | str:
        """Block up to ``timeout`` s for a task of ``name``; else :data:`WAIT` or :data:`FINISH`.

        ``is_active`` reports whether the caller is still connected: a client
        that vanished during its long poll stops counting as available at once
        (call :meth:`wake` when the connection drops).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            client = self._client_locked(name)
            client.polling += 1
            client.missed = False
            self._cond.notify_all()  # a sampler may be waiting for this client
            try:
                while is_active():
                    client.last_seen = time.monotonic()
                    if self._finished:
                        client.finished = True
                        return FINISH
                    phase = self._phase
                    if phase is not None and name in phase.tasks and name not in phase.results:
                        return phase.tasks[name]
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                return WAIT
            finally:
                client.polling -= 1
                if is_active():
                    client.last_seen = time.monotonic()
                else:
                    client.last_seen = -math.inf

    def wake(self) -> None:
        """Re-check every waiting long poll (e.g. after a client disconnected)."""
        with self._cond:
            self._cond.notify_all()

    def delivered(self, task: Task, nbytes: int) -> None:
        """Count ``nbytes`` of model payload sent for ``task`` (when its phase is still open)."""
        with self._cond:
            phase = self._phase
            if phase is not None and phase.tasks.get(task.client) is task:
                phase.bytes_down += nbytes

    def open_task(self, name: str, task_id: str) -> Task:
        """The open, unanswered task ``task_id`` of ``name``, or :class:`StaleTask`."""
        with self._cond:
            self._client_locked(name)
            return self._open_task_locked(name, task_id)

    def submit(self, task: Task, result: FitResult | EvaluateResult, nbytes: int) -> None:
        """Record ``result`` for ``task``; :class:`StaleTask` when the phase closed meanwhile."""
        with self._cond:
            phase = self._phase
            self._open_task_locked(task.client, task.task_id)
            assert phase is not None
            phase.results[task.client] = result
            phase.bytes_up += nbytes
            self._clients[task.client].last_seen = time.monotonic()
            self._cond.notify_all()

    def client_id(self, name: str) -> int:
        with self._cond:
            return self._client_locked(name).id

    def stop(self) -> None:
        """Ask the round loop to stop at once and release every long poll."""
        with self._cond:
            self._stopping = True
            if self._phase is not None and self._phase.secure is not None:
                self._phase.secure.stop()
            self._cond.notify_all()

    # -- the round loop --------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) every round; return the per-round records of the state dir."""
        last = self.store.last_round()
        if last is None:
            self.store.save_round(0, self.params, strategy_state(self.strategy), {"round": 0})
            last = 0
        else:
            self.params, state = self.store.load_round(last)
            load_strategy_state(self.strategy, state)
            log.info("resuming after round %d from %s", last, self.store.dir)
        self.store.write_metrics_file()
        try:
            for server_round in range(last + 1, self.settings.rounds + 1):
                self.current_round = server_round
                self._round(server_round)
            self._finish()
        except _Stopped:
            log.info("stopped before round %d completed", self.current_round)
        return self.store.round_records()

    def _round(self, server_round: int) -> None:
        start = time.perf_counter()
        settings, strategy = self.settings, self.strategy
        payload, codec = self._global_payload()
        fit_config = self._fit_config(server_round)
        bytes_down = bytes_up = 0
        results: list[FitResult] = []
        total, included = np.zeros(0), list[int]()
        sampled: list[str] = []
        attempts = 0
        for attempt in range(1, settings.max_round_retries + 2):
            attempts = attempt
            sampled = self._sample("fit", server_round, attempt)
            if settings.secagg_threshold:
                secure, phase = self._secure_phase(
                    server_round, attempt, sampled, payload, codec, fit_config
                )
                bytes_down += phase.bytes_down
                bytes_up += phase.bytes_up
                if secure is not None:
                    total, included = secure
                    break
                results = []
            else:
                phase = self._run_phase(
                    "fit", server_round, attempt, sampled, payload, codec, fit_config
                )
                bytes_down += phase.bytes_down
                bytes_up += phase.bytes_up
                results = [r for r in phase.results.values() if isinstance(r, FitResult)]
                if len(results) >= strategy.min_fit_clients:
                    break
            log.warning(
                "round %d attempt %d: %d of %d sampled clients answered before the deadline, "
                "%d needed%s",
                server_round,
                attempt,
                len(results),
                len(sampled),
                strategy.min_fit_clients,
                "; retrying" if attempt <= settings.max_round_retries else "",
            )
        else:
            raise WorkerFailure(
                f"round {server_round} failed {attempts} times: fewer than min_fit_clients="
                f"{strategy.min_fit_clients} clients answered within round_timeout_s="
                f"{settings.round_timeout_s}; start more clients or raise the deadline"
            )
        record: dict[str, Any] = {
            "round": server_round,
            "attempts": attempts,
            "sampled": len(sampled),
        }
        if settings.secagg_threshold:
            record.update(self._aggregate_secure(server_round, total, included))
        else:
            results.sort(key=lambda r: r.client_id)
            self.params = strategy.aggregate_fit(server_round, results, self.params)
            record["clients"] = sorted(self._name_of(r.client_id) for r in results)
            record["num_examples"] = sum(r.num_examples for r in results)
            record.update(
                weighted_metrics([r.metrics for r in results], [r.num_examples for r in results])
            )
        if settings.server_evaluate and self.test_data is not None:
            loss, acc = evaluate(self.eval_model, self.params, *self.test_data, names=self.names)
            record.update(test_loss=loss, test_accuracy=acc)
        if settings.evaluate_every and server_round % settings.evaluate_every == 0:
            eval_metrics, down, up = self._client_evaluate(server_round)
            record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
            bytes_down += down
            bytes_up += up
        record.update(strategy.round_metrics())
        record.update(bytes_down=bytes_down, bytes_up=bytes_up)
        record["seconds"] = time.perf_counter() - start
        self.store.save_round(server_round, self.params, strategy_state(strategy), record)
        self.store.append_metrics(record)
        if settings.keep_checkpoints is not None:
            self.store.prune(settings.keep_checkpoints)
        log.info("round %d: %s", server_round, _format(record))

    def _client_evaluate(self, server_round: int) -> tuple[dict[str, float], int, int]:
        names = self._sample("evaluate", server_round, 1)
        if not names:
            log.info("round %d: too few clients available for client-side evaluation", server_round)
            return {}, 0, 0
        payload, codec = self._global_payload()
        phase = self._run_phase("evaluate", server_round, 1, names, payload, codec, {})
        results = [r for r in phase.results.values() if isinstance(r, EvaluateResult)]
        return (
            self.strategy.aggregate_evaluate(server_round, results),
            phase.bytes_down,
            phase.bytes_up,
        )

    def _fit_config(self, server_round: int) -> dict[str, Any]:
        s = self.settings
        config: dict[str, Any] = {
            "lr": s.lr,
            "local_epochs": s.local_epochs,
            "batch_size": s.batch_size,
            "max_steps": s.max_local_steps,
            "upload_codec": s.upload_codec,
            "topk_fraction": s.topk_fraction,
            "error_feedback": s.error_feedback,
        }
        config.update(self.strategy.fit_config(server_round))
        if s.secagg_threshold:
            config["secagg_threshold"] = s.secagg_threshold
            if isinstance(self.strategy, DifferentialPrivacy):
                # The server never sees one update, so clients clip their own (and add no
                # noise in central mode: the server noises the sum); DP weights uniformly.
                config["secagg_weighting"] = "uniform"
                config.setdefault("dp_clip_norm", self.strategy.clip_norm)
                config.setdefault("dp_noise_multiplier", 0.0)
        return config

    def _secure_phase(
        self,
        server_round: int,
        attempt: int,
        names: Sequence[str],
        payload: bytes,
        codec: str,
        config: dict[str, Any],
    ) -> tuple[tuple[np.ndarray, list[int]] | None, _Phase]:
        """A fit phase whose results arrive only as a secure sum; None when it failed."""
        with self._cond:
            ids = [self._clients[n].id for n in names]
        dim = sum(math.prod(shape) for shape in self.shapes) + SECURE_EXTRA
        secure = SecureFitRound(ids, dim, self.settings.secagg_threshold)
        first, later = self.settings.round_timeout_s, self.settings.secagg_timeout_s
        phase = self._open_phase("fit", server_round, attempt, names, payload, codec, config)
        phase.secure = secure
        with self._cond:
            self._phase = phase
            self._cond.notify_all()
        try:
            outcome: tuple[np.ndarray, list[int]] | None = secure.run(
                lambda step: first if step == 0 else later, lambda: self._stopping
            )
        except SecAggError as exc:
            log.warning(
                "round %d attempt %d: secure aggregation failed: %s", server_round, attempt, exc
            )
            outcome = None
        finally:
            secure.stop()
            with self._cond:
                self._phase = None
                included = set(outcome[1]) if outcome is not None else set()
                for name, client_id in zip(names, ids, strict=True):
                    if client_id not in included:
                        self._clients[name].missed = True
        if self._stopping:
            raise _Stopped
        phase.bytes_up += secure.bytes_up
        phase.bytes_down += secure.bytes_down
        return outcome, phase

    def _aggregate_secure(
        self, server_round: int, total: np.ndarray, included: list[int]
    ) -> dict[str, Any]:
        """Apply a round's secure sum ``[sum w*update, sum w*loss, sum n, sum w]``."""
        weight, examples = float(total[-1]), float(total[-2])
        if weight <= 0:
            raise SecAggError("secure sum carries no weight; clients sent empty updates")
        flat = torch.from_numpy(total[:-SECURE_EXTRA])
        if isinstance(self.strategy, DifferentialPrivacy):
            summed = unflatten(flat, self.params)
            self.params = self.strategy.aggregate_sum(
                server_round, summed, len(included), self.params
            )
        else:
            mean = unflatten(flat / weight, self.params)
            result = FitResult(-1, mean, round(examples), is_update=True)
            self.params = self.strategy.aggregate_fit(server_round, [result], self.params)
        return {
            "clients": sorted(self._name_of(c) for c in included),
            "num_examples": round(examples),
            "train_loss": float(total[-3]) / weight,
            "secure_aggregation": True,
        }

    def _global_payload(self) -> tuple[bytes, str]:
        codec = self.settings.download_codec
        return encode_parameters(self.params, make_encoder(codec)), codec

    def _sample(self, kind: str, server_round: int, attempt: int) -> list[str]:
        """Names of the clients the strategy picks; fit waits for enough to be available."""
        rng = np.random.default_rng([self.seed, server_round, attempt, kind == "fit"])
        configure = (
            self.strategy.configure_fit if kind == "fit" else self.strategy.configure_evaluate
        )
        deadline = time.monotonic() + self.settings.client_wait_timeout_s
        next_log = time.monotonic() + 10.0
        with self._cond:
            while True:
                if self._stopping:
                    raise _Stopped
                available = self._available_locked()
                chosen = configure(server_round, sorted(available), rng)
                if chosen:
                    return [available[c] for c in chosen]
                if kind != "fit":
                    return []
                now = time.monotonic()
                if now > deadline:
                    raise UserError(
                        f"round {server_round}: only {len(available)} clients available after "
                        f"{self.settings.client_wait_timeout_s:.0f}s, strategy "
                        f"{self.strategy.name!r} needs more (min_fit_clients="
                        f"{self.strategy.min_fit_clients}, min_available_clients="
                        f"{self.strategy.min_available_clients}); start more clients"
                    )
                if now > next_log:
                    log.info(
                        "round %d: waiting for clients (%d available)", server_round, len(available)
                    )
                    next_log = now + 30.0
                self._cond.wait(0.5)

    def _run_phase(
        self,
        kind: str,
        server_round: int,
        attempt: int,
        names: Sequence[str],
        payload: bytes,
        codec: str,
        config: dict[str, Any],
    ) -> _Phase:
        phase = self._open_phase(kind, server_round, attempt, names, payload, codec, config)
        tasks = phase.tasks
        deadline = time.monotonic() + self.settings.round_timeout_s
        with self._cond:
            self._phase = phase
            self._cond.notify_all()
            try:
                while len(phase.results) < len(tasks):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    if self._stopping:
                        raise _Stopped
                    self._cond.wait(remaining)
            finally:
                self._phase = None
            for name in tasks:
                if name not in phase.results:
                    self._clients[name].missed = True
        return phase

    def _open_phase(
        self,
        kind: str,
        server_round: int,
        attempt: int,
        names: Sequence[str],
        payload: bytes,
        codec: str,
        config: dict[str, Any],
    ) -> _Phase:
        sha = sha256_hex(payload)
        tasks = {
            n: Task(
                f"{self.run_id}/{server_round}/{attempt}/{kind}/{n}",
                kind,
                server_round,
                n,
                config,
                payload,
                sha,
                codec,
            )
            for n in names
        }
        return _Phase(tasks)

    def secure_round(self, task: Task) -> SecureFitRound:
        """The secure aggregation of ``task``'s open phase, or :class:`StaleTask`."""
        with self._cond:
            phase = self._phase
            if phase is None or phase.secure is None or phase.tasks.get(task.client) is not task:
                raise StaleTask(
                    f"task {task.task_id!r} has no open secure aggregation; poll GetTask again"
                )
            return phase.secure

    def _finish(self) -> None:
        """Tell every connected client to finish; wait (bounded) until they have heard it."""
        grace = time.monotonic() + self.settings.poll_timeout_s + 2.0
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            while time.monotonic() < grace and not self._stopping:
                live = self._available_locked(include_missed=True)
                if all(self._clients[n].finished for n in live.values()):
                    break
                self._cond.wait(0.2)

    # -- helpers (lock held) ---------------------------------------------------

    def _client_locked(self, name: str, client_id: int | None = None) -> _Client:
        client = self._clients.get(name)
        if client is None:
            if client_id is None:
                client_id = self.store.clients().get(name)
            if client_id is None:
                raise NotJoined(f"client {name!r} has not joined; call Join first")
            client = self._clients[name] = _Client(client_id, name, time.monotonic())
        return client

    def _open_task_locked(self, name: str, task_id: str) -> Task:
        phase = self._phase
        task = phase.tasks.get(name) if phase is not None else None
        if phase is None or task is None or task.task_id != task_id:
            raise StaleTask(
                f"task {task_id!r} is not open (its round closed or the server restarted); "
                "poll GetTask for a new one"
            )
        if name in phase.results:
            raise StaleTask(f"task {task_id!r} was already answered; poll GetTask for a new one")
        return task

    def _available_locked(self, include_missed: bool = False) -> dict[int, str]:
        now = time.monotonic()
        timeout = self.settings.client_timeout_s
        return {
            c.id: c.name
            for c in self._clients.values()
            if (include_missed or not c.missed) and (c.polling > 0 or now - c.last_seen < timeout)
        }

    def _name_of(self, client_id: int) -> str:
        with self._cond:
            for client in self._clients.values():
                if client.id == client_id:
                    return client.name
        return str(client_id)


def _format(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key in ("round", "clients"):
            continue
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
