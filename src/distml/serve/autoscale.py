"""Autoscaling of the replica pool on load, with hysteresis delays.

The load is the number of ongoing HTTP requests (queued, in a batch or
running; a batch of many requests counts as many) per serving replica. Above
``scale_up_load`` for a full ``upscale_delay_s`` the pool grows by one
replica; below ``scale_down_load`` for ``downscale_delay_s`` it shrinks by
one, always within ``[min_replicas, max_replicas]``. Each decision is logged and counted in the
``distml_serve_scaling_events`` metric. :meth:`Autoscaler.step` is the whole
policy and takes the clock as an argument, so it is tested without sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from distml.serve.metrics import ServeMetrics
from distml.serve.pool import ReplicaPool
from distml.serve.settings import ServeSettings

log = logging.getLogger("distml.serve")


class Autoscaler:
    def __init__(
        self,
        pool: ReplicaPool,
        load: Callable[[], float],
        settings: ServeSettings,
        metrics: ServeMetrics,
        interval_s: float = 0.1,
    ) -> None:
        self.pool = pool
        self.load = load
        self.settings = settings
        self.metrics = metrics
        self.interval_s = interval_s
        self.lo, self.hi = settings.replica_bounds
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events: list[tuple[float, str, int]] = []

    def step(self, now: float) -> int:
        """One decision at time ``now``: +1, -1 or 0 replicas."""
        s = self.settings
        size = self.pool.target_size()
        per_replica = self.load() / max(1, size)
        if per_replica <= s.scale_up_load:
            self._above_since = None
        elif self._above_since is None:
            self._above_since = now
        if per_replica >= s.scale_down_load:
            self._below_since = None
        elif self._below_since is None:
            self._below_since = now
        up = self._above_since is not None and now - self._above_since >= s.upscale_delay_s
        down = self._below_since is not None and now - self._below_since >= s.downscale_delay_s
        if up and size < self.hi:
            return self._scale(size + 1, "up", per_replica, now)
        if down and size > self.lo:
            return self._scale(size - 1, "down", per_replica, now)
        return 0

    def _scale(self, target: int, direction: str, per_replica: float, now: float) -> int:
        delta = self.pool.scale_to(target)
        # Restart both clocks: the next decision needs a full delay of evidence at the new size.
        self._above_since = self._below_since = None
        self.metrics.scaling_events.labels(direction=direction).inc()
        self.events.append((now, direction, target))
        log.info(
            "autoscaler: scale %s to %d replicas (load %.2f per replica)",
            direction,
            target,
            per_replica,
        )
        return delta

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step(time.monotonic())
            except Exception:  # a scaling hiccup must not end autoscaling
                log.exception("autoscaler step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
