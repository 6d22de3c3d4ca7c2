"""Prometheus metrics of one server, in its own registry (``GET /metrics``, text format 0.0.4)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.batcher import BatchStats

#: Request latency buckets, seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch-size buckets, requests per engine call.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The server's metrics.

    - ``ocr_requests_total{endpoint, status}``: answered requests by HTTP status code.
    - ``ocr_request_seconds{endpoint}``: latency from the request's arrival to its answer.
    - ``ocr_batch_size``: requests per engine call.
    - ``ocr_engine_seconds``: seconds per engine call (its ``_sum`` is engine time in all).
    - ``ocr_expired_total``: requests dropped at their deadline before the engine.
    - ``ocr_queue_depth``: requests admitted and not yet in an engine call.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ocr_requests", "Answered requests by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ocr_request_seconds", "Request latency, arrival to answer.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ocr_batch_size", "Requests per engine call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.engine_seconds = Histogram("ocr_engine_seconds", "Seconds per engine call.",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.expired = Counter("ocr_expired", "Requests dropped at their deadline, unrun.",
                               registry=self.registry)
        self.queue_depth = Gauge("ocr_queue_depth",
                                 "Requests admitted and not yet in an engine call.",
                                 registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one engine call (``stats.size`` 0: all its requests had expired)."""
        if stats.size:
            self.batch_size.observe(stats.size)
            self.engine_seconds.observe(stats.engine_seconds)
        if stats.expired:
            self.expired.inc(stats.expired)
