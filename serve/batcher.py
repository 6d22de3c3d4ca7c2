"""Width-bucketed dynamic batching: requests of equal input width share an engine call.

Each request's pixels are already resized by the model's width policy, so its width is
known on arrival. Requests wait in one bucket per width; a bucket is due when it holds
``max_batch_size`` requests or its oldest request has waited ``max_wait_s`` (Triton's
dynamic batcher's two rules, ``preferred_batch_size`` and ``max_queue_delay_microseconds``,
applied per width). When several are due (the engine was busy), the fullest goes first,
unless some request has waited too long (see :meth:`WidthBatcher._pick`): then the oldest.
Nothing is padded, so a served answer equals the offline batch-1 answer (PaddleOCR pads to
the widest crop and its users report changed texts: PaddleOCR issues #5603, #6116, #5143).

No engine work for a request that cannot meet its deadline: the batcher keeps moving
averages of the engine's time per request and of the time from an engine call's end to the
decoded answers, so a batch of ``n`` is expected to be answered ``n`` requests' engine time
plus that tail after it starts. Admission (:meth:`WidthBatcher.reserve` with a deadline)
refuses a request whose expected wait, the queue ahead of it at the per-request rate, would
pass its deadline (the caller answers 503 at once rather than 504 later), and a batch leaves
out the requests whose deadline falls before the batch is expected to be answered.

``lanes`` engine threads per :class:`WidthBatcher` (each takes the next due bucket) call
:meth:`pipeline.Recognizer.submit`, which runs the engine and hands CTC decoding to the
recogniser's decode thread, so the next batch's engine call overlaps this one's decoding.
Engine threads run below the process's priority (:data:`ENGINE_NICENESS`).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import EngineError
from models.db_postprocess import boxes_from_map
from pipeline.classifier import Classifier
from pipeline.detector import Detector
from pipeline.recognizer import BatchResult, Recognizer
from preprocess.batching import batch_inputs

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; the caller should retry later."""


class DeadlineExceeded(Exception):
    """The request's deadline passed, or would pass, before its batch is answered."""


#: Weight of the newest batch in the moving averages of batch time.
SMOOTHING = 0.2
#: How much lower than the process an engine thread runs (Linux niceness, +N): the event loop
#: that reads requests, refuses what cannot be answered in time and writes answers goes
#: first when the cores are short, so overload is shed instead of queued in the sockets; an
#: idle event loop leaves the cores to the engine.
ENGINE_NICENESS = 10


def lower_thread_priority(niceness: int = ENGINE_NICENESS) -> None:
    """Run the calling thread ``niceness`` steps below the process (Linux threads have their
    own niceness; elsewhere nothing changes). A thread may always lower its own priority."""
    if not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    except OSError as exc:  # a sandbox that forbids it: run at the process's priority
        logger.warning("could not lower the engine thread's priority (%s)", exc)


class EngineFailed(Exception):
    """The engine failed on the batch holding this request; the message is its reason."""


class Stopped(Exception):
    """The batcher was closed before this request reached the engine."""


@dataclass
class BatchStats:
    """What one engine call did, for metrics: ``size`` requests, ``engine_seconds`` in the
    engine, ``expired`` requests dropped at their deadline before it, ``queued_seconds`` the
    sum over its requests of the time from being queued to the call's start."""

    size: int
    engine_seconds: float
    expired: int
    queued_seconds: float = 0.0


@dataclass(eq=False)
class _Request:
    pixels: np.ndarray
    deadline: float
    enqueued: float
    future: Future = field(default_factory=Future)
    extra: Any = None
    tag: float = 0.0  # fair-queueing finish tag: smaller goes first


def _tag(request: _Request) -> float:
    return request.tag


class WidthBatcher:
    """Queue resized images per width and feed the engine equal-width batches.

    Args:
        recognizer: a loaded :class:`pipeline.Recognizer`; its engine is used from this
            batcher's engine threads only.
        max_batch_size: most requests per engine call (>= 1).
        max_wait_s: longest a bucket's oldest request waits for the bucket to fill, in
            seconds (>= 0).
        max_queue: most requests admitted and not yet in an engine call (>= 1).
        on_batch: called with each engine call's :class:`BatchStats` once its results are
            handed out (on the decode thread; on the engine thread when every request of
            the batch had expired), for metrics.
        lanes: engine threads, each taking the next due bucket (>= 1; above 1 the runner
            must run concurrently, as ONNX Runtime's does: ``Runner.concurrent_infer``).
            A batch takes at most one lane's share of the queue (:meth:`share`), and
            admission's expected wait counts the lanes.

    Raises:
        ValueError: a limit out of range.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        lanes: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or lanes < 1:
            raise ValueError(f"batcher limits out of range: max_batch_size={max_batch_size}, "
                             f"max_queue={max_queue}, max_wait_s={max_wait_s}, lanes={lanes}")
        self.recognizer = recognizer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.lanes = lanes
        self._cond = threading.Condition()
        self._buckets: dict[int, list[_Request]] = {}  # each sorted by tag
        # Fair queueing between flows (one flow per client request): each queued item gets
        # a finish tag, one past the later of the flow's last tag and the virtual time (the
        # largest tag sent to the engine), so a one-image request queued behind a 250-image
        # one is served after at most one more of the big request's items in its bucket
        # (Demers, Keshav and Shenker, "Analysis and simulation of a fair queueing
        # algorithm", SIGCOMM 1989, with unit-cost items).
        self._virtual = 0.0
        self._flow_tags: dict[Hashable, float] = {}
        self._admitted = 0  # reserved slots: being preprocessed or waiting in a bucket
        # A due bucket's request that has waited this long goes before fuller buckets.
        self.patience_s = max(0.05, 10 * max_wait_s)
        self._closing = False
        self._flush = False
        self._threads: list[threading.Thread] = []
        #: Moving averages (seconds) of the engine thread's time per request of a batch, and
        #: of the time from a batch's engine call returning to its answers (decoding); 0
        #: until the first batch.
        self.request_seconds = 0.0
        self.tail_seconds = 0.0

    # -- admission -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests admitted and not yet in an engine call."""
        return self._admitted

    def expected_batch_seconds(self, size: int) -> float:
        """Seconds from a batch of ``size`` requests entering the engine to its answers, at the
        measured per-request rate (0 before the first batch): an engine call's time grows with
        its batch, so one average over batches of every size would promise a full batch the
        time of a lone request."""
        return size * self.request_seconds + self.tail_seconds

    def expected_wait(self, count: int = 1) -> float:
        """Seconds until ``count`` requests admitted now would be answered, at the measured
        per-request rate (0 before the first batch): the queue ahead of them drains across
        the lanes, and then their own batch (a lane's share, :meth:`share`, answered
        together) runs on one lane."""
        ahead = self._admitted + count
        batch = self.share(ahead)
        return ((ahead - batch) * self.request_seconds / self.lanes
                + self.expected_batch_seconds(batch))

    def share(self, queued: int) -> int:
        """Most requests one batch takes with ``queued`` requests waiting: one lane's share,
        ``ceil(queued / lanes)``, at least 1 and at most ``max_batch_size``. One lane does
        not hold requests in a long batch while another lane has nothing to run: under load
        the share is the whole ``max_batch_size``; at a few requests in flight, where a
        batch barely lowers the engine's time per image on a compute-bound host, the lanes
        split the work and answer sooner."""
        return max(1, min(self.max_batch_size, -(-queued // self.lanes)))

    def check_room(self, count: int, deadline: float | None = None) -> None:
        """Whether ``count`` requests could be admitted now (nothing is reserved).

        Raises:
            QueueFull: the queue is full, or its expected wait would pass ``deadline``
                (``time.monotonic()`` seconds).
            Stopped: the batcher is closing.
        """
        if self._closing:
            raise Stopped("the server is shutting down")
        if self._admitted + count > self.max_queue:
            raise QueueFull(f"the queue is full ({self._admitted} of {self.max_queue} "
                            f"requests waiting)")
        if deadline is not None:
            wait = self.expected_wait(count)
            if time.monotonic() + wait > deadline:
                raise QueueFull(f"the queue's expected wait ({1000 * wait:.0f} ms for "
                                f"{self._admitted} requests waiting) would pass the request's "
                                f"deadline")

    def reserve(self, count: int = 1, deadline: float | None = None) -> None:
        """Admit ``count`` requests (all or none) before they are preprocessed.

        Raises:
            QueueFull: the queue cannot take them now, or (given ``deadline``) they would
                not be answered before it (:meth:`check_room`).
            Stopped: the batcher is closing.
        """
        with self._cond:
            self.check_room(count, deadline)
            self._admitted += count

    def release(self, count: int = 1) -> None:
        """Give back reserved slots whose requests will not be submitted (bad input)."""
        with self._cond:
            self._admitted -= count

    def _key(self, pixels: np.ndarray):
        """The bucket of a request: its input width."""
        return pixels.shape[1]

    def submit(self, pixels: np.ndarray, deadline: float, extra: Any = None,
               flow: Hashable | None = None) -> Future:
        """Queue one reserved request.

        Args:
            pixels: uint8 resized pixels (``preprocess.image.resize``): ``[H, W]`` or
                ``[H, W, 3]``.
            deadline: ``time.monotonic()`` after which the request is dropped unrun.
            flow: the client request this item belongs to (its images share a flow and
                take turns with other flows); None: a flow of its own.

        Returns:
            A future of the request's :class:`models.ctc.Decoded`, or failing with
            :class:`DeadlineExceeded`, :class:`EngineFailed` or :class:`Stopped`. Cancelling
            it before the engine call drops the request.
        """
        request = _Request(pixels, deadline, time.monotonic(), extra=extra)
        with self._cond:
            last = self._flow_tags.get(flow, 0.0) if flow is not None else 0.0
            request.tag = max(self._virtual, last) + 1.0
            if flow is not None:
                self._flow_tags[flow] = request.tag
            bisect.insort_right(self._buckets.setdefault(self._key(pixels), []), request,
                                key=_tag)
            self._cond.notify_all()
        return request.future

    # -- engine thread -----------------------------------------------------------------------
    def start(self) -> WidthBatcher:
        """Start the engine threads (one per lane)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name=f"engine_{lane}",
                                              daemon=True) for lane in range(self.lanes)]
            for thread in self._threads:
                thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, send every queued one to the engine now, and stop.

        Requests still queued when the thread ends (it did not end within ``timeout``
        seconds) fail with :class:`Stopped`.
        """
        with self._cond:
            self._closing = True
            self._flush = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._cond:
            for bucket in self._buckets.values():
                for request in bucket:
                    if request.future.set_running_or_notify_cancel():
                        request.future.set_exception(Stopped("the server shut down"))
            self._buckets.clear()

    def flush(self) -> None:
        """Send buckets to the engine without waiting for them to fill (when draining)."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def _pick(self, now: float) -> tuple[int | None, float | None]:
        """The width whose bucket goes next (the engine is idle), or the seconds until one
        is due.

        Due buckets: full, or their oldest request has waited ``max_wait_s``, or flushing.
        A due bucket is overdue when one of its requests has waited ``patience_s`` (10 x
        ``max_wait_s``, at least 50 ms) or half its time to its deadline; the overdue bucket
        whose first request has the smallest fair-queueing tag goes first (the flow that has
        had the least service), the one holding the oldest request on a tie (first come,
        first served among one-image requests, whose tags tie within a round); with none
        overdue, the one giving the largest batch (:meth:`_batch_cap` caps it: more
        requests per engine call, so rare widths cost the engine fewer calls), the oldest on
        a tie.
        """
        overdue = overdue_rank = fullest = fullest_rank = None
        wait = None
        cap = self._batch_cap()
        for width, bucket in self._buckets.items():
            oldest = min(r.enqueued for r in bucket)
            ready_at = oldest + self.max_wait_s
            full = len(bucket) >= self.max_batch_size
            if not (full or ready_at <= now or self._flush):
                wait = ready_at - now if wait is None else min(wait, ready_at - now)
                continue
            urgent = any(now - r.enqueued >= min(self.patience_s, (r.deadline - r.enqueued) / 2)
                         for r in bucket if r.deadline > now)  # the expired are dropped
            if urgent and (overdue is None or (bucket[0].tag, oldest) < overdue_rank):
                overdue, overdue_rank = width, (bucket[0].tag, oldest)
            rank = (min(len(bucket), cap), -oldest)
            if fullest is None or rank > fullest_rank:
                fullest, fullest_rank = width, rank
        return (overdue if overdue is not None else fullest), wait

    def _batch_cap(self) -> int:
        """Most requests the next batch takes: a lane's :meth:`share` of everything queued."""
        return self.share(sum(len(bucket) for bucket in self._buckets.values()))

    def _next_batch(self) -> list[_Request] | None:
        """Block until a bucket is due, then take up to :meth:`_batch_cap` of its requests;
        None when closing and nothing is left."""
        with self._cond:
            while True:
                width, wait = self._pick(time.monotonic())
                if width is not None:
                    bucket = self._buckets[width]
                    cap = self._batch_cap()
                    taken = bucket[:cap]
                    del bucket[:cap]
                    if not bucket:
                        del self._buckets[width]
                    self._virtual = max(self._virtual, taken[-1].tag)
                    self._flow_tags = {flow: tag for flow, tag in self._flow_tags.items()
                                       if tag > self._virtual}
                    self._admitted -= len(taken)
                    return taken
                if self._closing and not self._buckets:
                    return None
                self._cond.wait(wait)

    def _run(self) -> None:
        lower_thread_priority()
        while (taken := self._next_batch()) is not None:
            now = time.monotonic()
            expected = self.expected_batch_seconds(len(taken))
            live, expired = [], 0
            for request in taken:
                if not request.future.set_running_or_notify_cancel():
                    continue  # the client went away
                if request.deadline <= now + expected:
                    request.future.set_exception(DeadlineExceeded(
                        "the request's deadline passed while it was queued"
                        if request.deadline <= now else
                        f"the request's deadline would pass before its batch is answered "
                        f"(a batch of {len(taken)} takes about {1000 * expected:.0f} ms)"))
                    expired += 1
                    continue
                live.append(request)
            if not live:
                if self.on_batch is not None:
                    self.on_batch(BatchStats(0, 0.0, expired))
                continue
            try:
                self._dispatch(live, expired)
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep the thread serving
                self._fail(live, exc)

    @staticmethod
    def _fail(requests: list[_Request], exc: Exception) -> None:
        """Answer every still-open request of a failed batch with :class:`EngineFailed`
        (the service's 500); an error that is not an ``EngineError`` is logged with its trace."""
        if not isinstance(exc, EngineError):
            logger.error("a batch of %d requests failed", len(requests), exc_info=exc)
        for request in requests:
            if not request.future.done():
                request.future.set_exception(EngineFailed(str(exc) or type(exc).__name__))

    def _dispatch(self, live: list[_Request], expired: int) -> None:
        """Run one batch of live requests (engine thread): the recogniser's engine now, CTC
        decoding on its decode thread."""
        pixels = [request.pixels for request in live]
        ((members, batch),) = batch_inputs(pixels, self.recognizer.spec, len(live))
        ordered = [live[m] for m in members]
        widths = [pixels[m].shape[1] for m in members]
        start = time.monotonic()
        done = self.recognizer.submit(ordered, batch, widths)  # returns once the engine ran
        busy = time.monotonic() - start
        done.add_done_callback(lambda finished, rows=ordered, n=expired:
                               self._resolve(finished, rows, n, start, busy))

    @staticmethod
    def _queued(requests: list[_Request], start: float) -> float:
        """Seconds the batch's requests waited in the queue, summed, to ``start``."""
        return sum(start - request.enqueued for request in requests)

    def _observe(self, size: int, seconds: float, busy_seconds: float) -> None:
        """Fold one batch of ``size`` requests into the averages: answered ``seconds`` after
        its engine call began, which held the engine thread ``busy_seconds`` (the engine
        thread is the queue's server; decoding overlaps the next batch)."""
        tail = max(0.0, seconds - busy_seconds)
        if self.request_seconds == 0.0:
            self.request_seconds, self.tail_seconds = busy_seconds / size, tail
            return
        self.request_seconds += SMOOTHING * (busy_seconds / size - self.request_seconds)
        self.tail_seconds += SMOOTHING * (tail - self.tail_seconds)

    def _resolve(self, done: Future, requests: list[_Request], expired: int,
                 start: float, busy: float) -> None:
        """Hand a decoded batch's rows (or its failure) to the requests' futures; runs on
        the decode thread. The batch's engine call began at ``start`` and held the engine
        thread ``busy`` seconds."""
        error = done.exception()
        if error is not None:  # a decoder bug: the requests fail with it, it is logged
            logger.error("decoding a batch failed", exc_info=error)
        result: BatchResult | None = None if error is not None else done.result()
        if result is not None and result.error is None:
            self._observe(len(requests), time.monotonic() - start, busy)
        for row, request in enumerate(requests):
            if error is not None:
                request.future.set_exception(error)
            elif result.error is not None:
                request.future.set_exception(EngineFailed(str(result.error)))
            else:
                request.future.set_result(result.decoded[row])
        if self.on_batch is not None:
            seconds = result.engine_seconds if result is not None else 0.0
            self.on_batch(BatchStats(len(requests), seconds, expired,
                                     self._queued(requests, start)))


class DetectorBatcher(WidthBatcher):
    """Queue detector inputs per input size and run equal-size batches through the detector.

    Each request is a float32 ``[3, H, W]`` input (``pipeline.detector.detector_input``) with
    its original image's ``(width, height)`` as ``extra``; its future gets the image's
    ``models.db_postprocess.TextBox`` list (DB post-processing runs on the engine thread).
    Admission, deadlines, buckets and the due rules are :class:`WidthBatcher`'s.
    """

    def __init__(self, detector: Detector, max_batch_size: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        super().__init__(None, max_batch_size, max_wait_s, max_queue, on_batch)
        self.detector = detector

    def _key(self, pixels: np.ndarray):
        return pixels.shape

    def _dispatch(self, live: list[_Request], expired: int) -> None:
        start = time.monotonic()
        maps = self.detector.probability_maps(np.stack([r.pixels for r in live]))
        seconds = self.detector.runner.last_engine_seconds
        for row, request in enumerate(live):
            try:
                boxes = boxes_from_map(maps[row], self.detector.spec, request.extra)
            except Exception as exc:  # noqa: BLE001 - fail this request, keep serving
                logger.exception("DB post-processing failed")
                request.future.set_exception(exc)
                continue
            request.future.set_result(boxes)
        elapsed = time.monotonic() - start  # engine and DB post-processing, both on this thread
        self._observe(len(live), elapsed, elapsed)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(live), seconds, expired, self._queued(live, start)))


class ClassifierBatcher(WidthBatcher):
    """Queue classifier inputs per input size and run equal-size batches through the
    classifier.

    Each request is a float32 ``[C, H, W]`` input (``pipeline.classifier.classifier_input``);
    its future gets the image's ``pipeline.classifier.Classification``. Admission, deadlines,
    buckets and the due rules are :class:`WidthBatcher`'s.
    """

    def __init__(self, classifier: Classifier, max_batch_size: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[BatchStats], None] | None = None,
                 lanes: int = 1) -> None:
        super().__init__(None, max_batch_size, max_wait_s, max_queue, on_batch, lanes)
        self.classifier = classifier

    def _key(self, pixels: np.ndarray):
        return pixels.shape

    def _dispatch(self, live: list[_Request], expired: int) -> None:
        start = time.monotonic()
        results = self.classifier.run(np.stack([r.pixels for r in live]))
        for request, result in zip(live, results):
            request.future.set_result(result)
        elapsed = time.monotonic() - start
        self._observe(len(live), elapsed, elapsed)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(live), self.classifier.runner.last_engine_seconds,
                                     expired, self._queued(live, start)))


__all__ = [
    "BatchStats",
    "ClassifierBatcher",
    "DetectorBatcher",
    "DeadlineExceeded",
    "EngineFailed",
    "QueueFull",
    "Stopped",
    "WidthBatcher",
]
