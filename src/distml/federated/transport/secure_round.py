"""Secure aggregation of one deployed fit phase: the four protocol steps as server-side barriers.

:class:`SecureFitRound` wraps a :class:`~distml.federated.secagg.SecAggServer`
for the clients sampled in a round. Transport handlers call :meth:`~SecureFitRound.submit`
with one client's message of a step; the call blocks until the round thread
closes that step (every expected client sent it, or the step deadline
passed) and then returns that client's answer: the key directory, the
ciphertexts addressed to it, the unmask request, or ``done``. Clients that
miss a step are left out of later steps, which is exactly the dropout the
protocol tolerates: a client gone before its masked input is not in the sum
(its pairwise masks are removed with its reconstructed key), one gone after
is (its self mask is removed with its reconstructed seed). The server object
keeps only the running sum of masked vectors, never one client's input.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distml.federated.secagg import (
    AdvertiseKeys,
    EncryptedShares,
    FixedPoint,
    MaskedInput,
    SecAggError,
    SecAggServer,
    UnmaskResponse,
)

#: Protocol steps in order; a client message of step ``i`` is answered when ``i`` closes.
STEPS = ("keys", "shares", "masked", "unmask")


class SecureFitRound:
    """One round's secure sum over the transport; :meth:`run` drives it from the round thread."""

    def __init__(
        self,
        client_ids: Sequence[int],
        dim: int,
        threshold: int,
        fixed_point: FixedPoint | None = None,
    ) -> None:
        self.server = SecAggServer(dim, threshold, fixed_point)
        self.expected: set[int] = set(client_ids)
        self.bytes_up = 0
        self.bytes_down = 0
        self._cond = threading.Condition()
        self._step = 0
        self._inbox: dict[int, Any] = {}
        self._replies: dict[int, Any] = {}
        self._closed = -1
        self._failed: str | None = None
        self._stopping = False

    # -- transport side --------------------------------------------------------

    def submit(self, step: str, client_id: int, message: Any, nbytes: int, timeout: float) -> Any:
        """Hand in ``client_id``'s ``step`` message (``nbytes`` long); block for its answer."""
        index = STEPS.index(step)
        with self._cond:
            if self._failed is not None:
                raise SecAggError(f"secure aggregation of this round failed: {self._failed}")
            if index != self._step or client_id not in self.expected:
                raise SecAggError(
                    f"client {client_id}: secure aggregation step {step!r} is not open for it "
                    "(it missed an earlier step or the step closed); wait for the next task"
                )
            if client_id in self._inbox:
                raise SecAggError(f"client {client_id}: sent step {step!r} twice")
            self._inbox[client_id] = message
            self.bytes_up += nbytes
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._closed < index and self._failed is None and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed < index or client_id not in self._replies:
                raise SecAggError(
                    self._failed or f"secure aggregation step {step!r} closed without this client"
                )
            return self._replies[client_id]

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- round thread ------------------------------------------------------------

    def run(
        self, step_timeout: Callable[[int], float], stopping: Callable[[], bool] = lambda: False
    ) -> tuple[np.ndarray, list[int]]:
        """Run all steps; returns the decoded float64 sum and the client ids it contains.

        ``step_timeout(i)`` is the deadline of step ``i`` in seconds (the first
        one also covers local training). Raises :class:`SecAggError` when a
        step ends with fewer clients than the threshold.
        """
        try:
            keys = self._take(0, step_timeout(0), stopping)
            directory = self.server.collect_keys(list(keys.values()))
            self._publish(0, {c: directory for c in directory.client_ids})
            shares = self._take(1, step_timeout(1), stopping)
            bundles = self.server.collect_shares(list(shares.values()))
            self._publish(1, dict(bundles))
            masked = self._take(2, step_timeout(2), stopping)
            request = self.server.collect_masked_inputs(list(masked.values()))
            self._publish(2, {c: request for c in request.survivor_ids})
            responses = self._take(3, step_timeout(3), stopping)
            total = self.server.finish(list(responses.values()))
            self._publish(3, {c: True for c in responses})
            return total, self.server.included_clients
        except Exception as exc:
            # Release every handler blocked on a step, whatever went wrong.
            with self._cond:
                self._failed = str(exc)
                self._cond.notify_all()
            raise

    def _take(self, index: int, timeout: float, stopping: Callable[[], bool]) -> dict[int, Any]:
        """Wait until every expected client sent step ``index`` or the deadline; close intake."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._inbox) < len(self.expected) and not stopping():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(min(remaining, 0.5))
            inbox, self._inbox = self._inbox, {}
            # Late messages of this step are refused from here on.
            self._step = index + 1
            return inbox

    def _publish(self, index: int, replies: dict[int, Any]) -> None:
        """Answer step ``index``; only clients with an answer take part in the next step."""
        with self._cond:
            self._replies = replies
            self.expected = set(replies)
            self._closed = index
            for reply in replies.values():
                self.bytes_down += _reply_size(reply)
            self._cond.notify_all()


def _reply_size(reply: Any) -> int:
    """Bytes of key material, ciphertexts or ids an answer carries (for the round metrics)."""
    if reply is True:
        return 1
    size = 0
    for value in vars(reply).values():
        if isinstance(value, bytes):
            size += len(value)
        elif isinstance(value, list):
            size += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
        else:
            size += 8
    return size


def as_message(step: str, client_id: int, payload: Any) -> Any:
    """The :mod:`~distml.federated.secagg` message of a protobuf step payload; checks lengths."""
    pairs = {
        "shares": [("recipient_ids", "ciphertexts")],
        "unmask": [("seed_owner_ids", "seed_shares"), ("key_owner_ids", "key_shares")],
    }
    for ids, blobs in pairs.get(step, []):
        if len(getattr(payload, ids)) != len(getattr(payload, blobs)):
            raise SecAggError(f"client {client_id}: {step} message needs one {blobs[:-1]} per id")
    if step == "keys":
        return AdvertiseKeys(
            client_id, bytes(payload.enc_public_key), bytes(payload.mask_public_key)
        )
    if step == "shares":
        return EncryptedShares(
            client_id,
            [int(i) for i in payload.recipient_ids],
            [bytes(c) for c in payload.ciphertexts],
        )
    if step == "masked":
        return MaskedInput(client_id, bytes(payload.data))
    return UnmaskResponse(
        client_id,
        [int(i) for i in payload.seed_owner_ids],
        [bytes(s) for s in payload.seed_shares],
        [int(i) for i in payload.key_owner_ids],
        [bytes(s) for s in payload.key_shares],
    )
