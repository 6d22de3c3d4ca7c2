"""Prometheus metrics of one server, in its own registry (``GET /metrics``, text format 0.0.4)."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.batcher import BatchStats

#: Request latency buckets, seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Batch-size buckets, requests per engine call.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


#: The endpoints whose answers count as the model's inference requests in its statistics.
INFERENCE_ENDPOINTS = frozenset({"service", "infer", "grpc_infer", "ocr", "ocr_prediction"})


@dataclass
class Duration:
    """A count and its cumulative duration in nanoseconds (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStatistics:
    """The model's statistics as Triton's statistics extension counts them (a snapshot).

    Attributes:
        success, fail: inference requests answered 200 / otherwise, with their latency from
            arrival to answer.
        queue: requests run by the engine, with the time each waited from being queued (its
            images decoded and resized) to its engine call.
        compute_infer: the same requests, with their engine call's duration each.
        inference_count: images the engine ran (Triton: inferences).
        execution_count: engine calls.
        batches: batch size -> engine calls of that size, with their durations.
        last_inference: milliseconds since the epoch of the last engine call (0: none yet).
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    last_inference: int = 0


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
        self._statistics = ModelStatistics()
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, int], object] = {}
        self._latencies: dict[str, object] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        counter = self._counters.get((endpoint, status))
        if counter is None:  # the labelled series, looked up once per endpoint and status
            counter = self._counters[endpoint, status] = self.requests.labels(endpoint,
                                                                              str(status))
            self._latencies[endpoint] = self.latency.labels(endpoint)
        counter.inc()
        self._latencies[endpoint].observe(seconds)
        if endpoint in INFERENCE_ENDPOINTS:
            with self._lock:
                (self._statistics.success if status == 200 else self._statistics.fail).add(
                    1, seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one engine call (``stats.size`` 0: all its requests had expired)."""
        if stats.size:
            self.batch_size.observe(stats.size)
            self.engine_seconds.observe(stats.engine_seconds)
            with self._lock:
                model = self._statistics
                model.queue.add(stats.size, stats.queued_seconds)
                model.compute_infer.add(stats.size, stats.engine_seconds * stats.size)
                model.inference_count += stats.size
                model.execution_count += 1
                model.batches.setdefault(stats.size, Duration()).add(1, stats.engine_seconds)
                model.last_inference = int(time.time() * 1000)
        if stats.expired:
            self.expired.inc(stats.expired)

    def statistics(self) -> ModelStatistics:
        """A consistent copy of the model's statistics (Triton's statistics extension)."""
        with self._lock:
            return copy.deepcopy(self._statistics)
