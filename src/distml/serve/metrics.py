"""Prometheus metrics of one model server, in a registry of its own.

Each app gets a private :class:`prometheus_client.CollectorRegistry`, so several
servers (or tests) in one process never collide. The series are what an
operator needs to size a deployment: requests by endpoint and status, request
latency, rows per executed batch and batch latency (predictions and generation
apart), the batch-size cap the adaptive batcher chose, queue depth, ready and
target replicas, replica restarts and autoscaling events.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distml_serve_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "distml_serve_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "distml_serve_batch_size",
            "rows per executed batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "distml_serve_batch_latency_seconds",
            "dispatch-to-result time of a batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generate_batch_size = Histogram(
            "distml_serve_generate_batch_size",
            "generation requests decoded together per batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.generate_batch_latency = Histogram(
            "distml_serve_generate_batch_latency_seconds",
            "dispatch-to-result time of a generation batch",
            buckets=(*_LATENCY_BUCKETS, 30.0, 60.0),
            registry=r,
        )
        self.batch_cap = Gauge(
            "distml_serve_batch_size_cap", "current cap on rows per batch", registry=r
        )
        self.queue_depth = Gauge(
            "distml_serve_queue_depth", "requests waiting for a batch or a replica", registry=r
        )
        self.replicas = Gauge("distml_serve_replicas", "replicas ready to serve", registry=r)
        self.replicas_target = Gauge(
            "distml_serve_replicas_target", "replicas wanted (ready or starting)", registry=r
        )
        self.replica_restarts = Counter(
            "distml_serve_replica_restarts", "replicas restarted after a crash", registry=r
        )
        self.scaling_events = Counter(
            "distml_serve_scaling_events", "autoscaler decisions", ["direction"], registry=r
        )

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
