"""The knobs of a model server, validated once, with the defaults ``distml serve`` uses.

One frozen dataclass holds batching (size cap, delay, the adaptive AIMD
target), replicas and autoscaling bounds, model parallelism inside a replica
(``tp``, ``pp``), and the robustness limits (body size, request timeout,
bearer token). :func:`make_settings` applies keyword
overrides and turns every bad value into one :class:`~distml.errors.UserError`
line naming the option and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distml.errors import UserError


@dataclass(frozen=True)
class ServeSettings:
    #: Worker processes that each hold the model; 0 runs the model in a server thread.
    replicas: int = 1
    #: Autoscaling bounds; both None keeps ``replicas`` fixed.
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: Ongoing requests (queued, batched or running) per serving replica above which to add one.
    scale_up_load: float = 2.0
    #: ... and below which to remove one.
    scale_down_load: float = 0.25
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    #: Rows per batch (the cap; adaptive mode moves it between 1 and this).
    max_batch_size: int = 32
    #: How long the first queued request waits for company before its batch runs.
    max_delay_ms: float = 5.0
    #: Also wait max_delay_ms when no batch is running (default: an idle server runs
    #: the queue at once; requests arriving meanwhile form the next batch).
    wait_when_idle: bool = False
    #: AIMD on the batch cap (Clipper): grow while batch p99 latency < target, halve above.
    adaptive_batching: bool = False
    target_p99_ms: float = 50.0
    #: Bearer token required on /v1/*; None leaves the API open (bind 127.0.0.1 then).
    token: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 30.0
    max_new_tokens: int = 512
    #: Seconds to wait for the first replicas to load the model.
    startup_timeout_s: float = 120.0
    device: str = "cpu"
    threads_per_replica: int = 1
    #: Model parallelism inside each replica: tp x pp processes in one gloo group.
    tp: int = 1
    pp: int = 1
    #: Micro-batches per pipelined forward (pp > 1).
    microbatches: int = 2

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.replicas >= 0, f"replicas={self.replicas} must be >= 0 (0 = in-process)")
        need(self.max_batch_size >= 1, f"max_batch_size={self.max_batch_size} must be >= 1")
        need(self.max_delay_ms >= 0, f"max_delay_ms={self.max_delay_ms} must be >= 0")
        need(self.target_p99_ms > 0, f"target_p99_ms={self.target_p99_ms} must be > 0")
        need(self.max_body_bytes > 0, f"max_body_bytes={self.max_body_bytes} must be > 0")
        need(self.request_timeout_s > 0, f"request_timeout_s={self.request_timeout_s} must be > 0")
        need(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        need(self.threads_per_replica >= 1, "threads_per_replica must be >= 1")
        need(self.device in ("cpu", "cuda"), f"device={self.device!r}: use cpu or cuda")
        need(self.token is None or len(self.token) > 0, "token must be non-empty (or None)")
        need(self.tp >= 1 and self.pp >= 1, f"tp={self.tp} and pp={self.pp} must be >= 1")
        need(self.microbatches >= 1, f"microbatches={self.microbatches} must be >= 1")
        need(
            not self.model_parallel or self.replicas >= 1,
            "model-parallel serving (tp or pp > 1) runs process groups: set replicas >= 1",
        )
        need(
            not self.model_parallel or self.device == "cpu",
            "model-parallel serving runs on cpu (gloo) for now; use device=cpu",
        )
        if self.autoscaling:
            lo, hi = self.replica_bounds
            need(
                self.replicas >= 1,
                "autoscaling needs process replicas: set replicas >= 1 with min/max_replicas",
            )
            need(1 <= lo <= hi, f"need 1 <= min_replicas ({lo}) <= max_replicas ({hi})")
            need(
                lo <= self.replicas <= hi,
                f"replicas={self.replicas} must lie within [{lo}, {hi}] (min/max_replicas)",
            )
            need(
                self.scale_down_load < self.scale_up_load,
                "scale_down_load must be below scale_up_load",
            )

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def replica_bounds(self) -> tuple[int, int]:
        lo = self.min_replicas if self.min_replicas is not None else min(1, self.replicas)
        hi = self.max_replicas if self.max_replicas is not None else self.replicas
        return lo, hi


def make_settings(base: ServeSettings | None = None, **overrides: Any) -> ServeSettings:
    """``base`` (or the defaults) with ``overrides``; unknown names raise UserError."""
    known = {f.name for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown serve option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base or ServeSettings(), **overrides)
