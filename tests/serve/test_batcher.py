"""The width batcher on the real nano-ocr export, in process: buckets, order, failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from common.errors import EngineError
from infer import open_model
from infer.onnxruntime_runner import OnnxRuntimeRunner
from models.det_spec import DetectorSpec
from pipeline import Recognizer
from preprocess.image import prepare
from serve.batcher import (
    DeadlineExceeded,
    DetectorBatcher,
    EngineFailed,
    QueueFull,
    WidthBatcher,
)
from tests.conftest import encode, render_line, word_image


class RecordingRunner(OnnxRuntimeRunner):
    """Test double: the real ONNX Runtime runner, recording each batch's shape, and
    failing (EngineError) on batches of width ``fail_width``."""

    def __init__(self, path, fail_width: int | None = None):
        super().__init__(path)
        self.shapes: list[tuple[int, ...]] = []
        self.fail_width = fail_width

    def infer(self, feed):
        (batch,) = feed.values()
        self.shapes.append(batch.shape)
        if batch.shape[-1] == self.fail_width:
            raise EngineError(f"test double: refusing width {self.fail_width}")
        return super().infer(feed)


def pixels_of_width(spec, text: str, image_width: int) -> np.ndarray:
    pixels, _ = prepare(encode(word_image(text, image_width, 32)), spec)
    return pixels


@pytest.fixture
def widths(parts) -> tuple[np.ndarray, np.ndarray]:
    """A narrow (clamped to the minimum width) and a wide word's resized pixels."""
    _, spec = parts
    return pixels_of_width(spec, "a", 50), pixels_of_width(spec, "widest words", 400)


@pytest.fixture
def parts(exported):
    path = exported["nano-ocr"]
    _, spec = open_model(path)
    return path, spec


def test_equal_widths_share_a_batch_and_answers_match_batch_1(parts):
    path, spec = parts
    runner = RecordingRunner(path)
    images = [pixels_of_width(spec, w, 40 * len(w)) for w in
              ("abc", "hello", "abd", "world", "abe", "serving")]
    widths = [p.shape[1] for p in images]
    with Recognizer(runner, spec) as recognizer:
        expected = [recognizer([p])[0].text for p in images]
        runner.shapes.clear()
        batcher = WidthBatcher(recognizer, max_batch_size=8, max_wait_s=0.2, max_queue=16)
        futures = [batcher.submit(p, time.monotonic() + 10) for p in images]
        batcher.start()
        texts = [f.result(10).text for f in futures]
        batcher.close()
    assert texts == expected
    assert sorted(s[-1] for s in runner.shapes) == sorted(set(widths))  # one call per width
    assert sum(s[0] for s in runner.shapes) == len(images)


def test_an_engine_error_fails_only_its_batch(parts):
    path, spec = parts
    good = pixels_of_width(spec, "good", 110)
    bad = pixels_of_width(spec, "badwidth", 300)
    assert good.shape[1] != bad.shape[1]
    runner = RecordingRunner(path, fail_width=bad.shape[1])
    with Recognizer(runner, spec) as recognizer:
        batcher = WidthBatcher(recognizer, max_batch_size=4, max_wait_s=0.05, max_queue=8)
        batcher.start()
        deadline = time.monotonic() + 10
        failing = [batcher.submit(bad, deadline) for _ in range(2)]
        passing = [batcher.submit(good, deadline) for _ in range(2)]
        for future in failing:
            with pytest.raises(EngineFailed, match="refusing width"):
                future.result(10)
        assert all(f.result(10).text for f in passing)
        later = batcher.submit(bad.copy(), time.monotonic() + 10)
        with pytest.raises(EngineFailed):
            later.result(10)
        assert batcher.submit(good, time.monotonic() + 10).result(10).text
        batcher.close()


def test_the_fullest_due_bucket_goes_first_and_expired_requests_never_run(parts, widths):
    path, spec = parts
    runner = RecordingRunner(path)
    narrow, wide = widths
    with Recognizer(runner, spec) as recognizer:
        runner.shapes.clear()
        batcher = WidthBatcher(recognizer, max_batch_size=8, max_wait_s=0.0, max_queue=16)
        now = time.monotonic()
        lone = batcher.submit(wide, now + 60)  # older, but its bucket is smaller
        expired = batcher.submit(wide, now - 1)
        crowd = [batcher.submit(narrow, now + 60) for _ in range(3)]
        batcher.start()
        for future in [lone, *crowd]:
            future.result(10)
        with pytest.raises(DeadlineExceeded):
            expired.result(10)
        batcher.close()
    assert runner.shapes[0][0] == 3 and runner.shapes[0][-1] == narrow.shape[1]
    assert sum(s[0] for s in runner.shapes) == 4  # the expired request never ran


def test_a_request_half_way_to_its_deadline_goes_before_fuller_buckets(parts, widths):
    path, spec = parts
    runner = RecordingRunner(path)
    narrow, wide = widths
    with Recognizer(runner, spec) as recognizer:
        runner.shapes.clear()
        batcher = WidthBatcher(recognizer, max_batch_size=8, max_wait_s=0.0, max_queue=16)
        urgent = batcher.submit(wide, time.monotonic() + 0.6)
        time.sleep(0.35)  # more than half of its 0.6 s are spent
        crowd = [batcher.submit(narrow, time.monotonic() + 60) for _ in range(3)]
        batcher.start()
        urgent.result(10)
        for future in crowd:
            future.result(10)
        batcher.close()
    assert runner.shapes[0][0] == 1 and runner.shapes[0][-1] == wide.shape[1]


def test_reservations_bound_the_queue(parts):
    path, spec = parts
    runner, _ = open_model(path)
    batcher = WidthBatcher(Recognizer(runner, spec), max_batch_size=4, max_wait_s=0.01,
                           max_queue=3)
    batcher.reserve(2)
    with pytest.raises(QueueFull, match="2 of 3"):
        batcher.reserve(2)
    batcher.release(2)
    batcher.reserve(3)
    assert batcher.depth == 3
    with pytest.raises(ValueError):
        WidthBatcher(Recognizer(runner, spec), max_batch_size=0, max_wait_s=0, max_queue=1)


class OrderRunner(OnnxRuntimeRunner):
    """Test double: the real runner, recording each batch's first image's pixel sum (which
    tells the test's two images apart)."""

    def __init__(self, path):
        super().__init__(path)
        self.sums: list[float] = []

    def infer(self, feed):
        (batch,) = feed.values()
        self.sums.append(float(batch[0].sum()))
        return super().infer(feed)


def test_a_small_request_takes_turns_with_a_big_one_queued_before_it(parts):
    """Twelve images of one request, then one of another, all of one width, one per engine
    call: the lone image runs second (fair queueing), not thirteenth (first come, first
    served)."""
    path, spec = parts
    big = pixels_of_width(spec, "bigger", 120)
    small = pixels_of_width(spec, "little", 120)
    assert big.shape == small.shape and big.sum() != small.sum()
    runner = OrderRunner(path)
    with Recognizer(runner, spec) as recognizer:
        alone = WidthBatcher(recognizer, max_batch_size=1, max_wait_s=0.0, max_queue=16).start()
        runner.sums.clear()
        for pixels in (small, big):  # each one's fingerprint as the engine sees it
            alone.submit(pixels, time.monotonic() + 30).result(10)
        alone.close()
        small_sum, big_sum = runner.sums
        runner.sums.clear()
        batcher = WidthBatcher(recognizer, max_batch_size=1, max_wait_s=0.0, max_queue=16)
        deadline = time.monotonic() + 30
        many = [batcher.submit(big, deadline, flow="big") for _ in range(12)]
        lone = batcher.submit(small, deadline, flow="small")
        batcher.start()
        for future in [*many, lone]:
            future.result(10)
        batcher.close()
    order = ["small" if abs(s - small_sum) < abs(s - big_sum) else "big" for s in runner.sums]
    assert order.index("small") == 1 and len(order) == 13


class SlowRunner(RecordingRunner):
    """Test double: the real runner, its engine taking at least ``seconds`` per call, or
    per image of the batch with ``per_image``."""

    def __init__(self, path, seconds: float, per_image: bool = False):
        super().__init__(path)
        self.seconds = seconds
        self.per_image = per_image

    def _infer(self, feed):
        images = next(iter(feed.values())).shape[0] if self.per_image else 1
        time.sleep(self.seconds * images)
        return super()._infer(feed)


def test_a_full_batch_is_expected_to_take_longer_than_a_lone_request(parts, widths):
    """After lone requests taught the batcher 0.3 s per image, a batch of 4 is expected to
    take 1.2 s: its request with 0.9 s left is dropped unrun (an average over batches
    would have promised a lone request's time, run it, and answered after its deadline),
    the others run. (The margins leave room for a loaded host's decoding and scheduling.)"""
    path, spec = parts
    narrow, _ = widths
    runner = SlowRunner(path, 0.3, per_image=True)
    with Recognizer(runner, spec) as recognizer:
        batcher = WidthBatcher(recognizer, max_batch_size=4, max_wait_s=0.3, max_queue=64)
        batcher.start()
        for _ in range(2):  # lone requests, each sent alone after 0.3 s
            batcher.reserve(1)
            batcher.submit(narrow, time.monotonic() + 10).result(10)
        assert runner.shapes and all(shape[0] == 1 for shape in runner.shapes)
        assert 0.3 <= batcher.expected_batch_seconds(1) < 0.9  # would run the tight one
        assert batcher.expected_batch_seconds(4) >= 1.2
        runner.shapes.clear()
        batcher.reserve(4)
        relaxed = [batcher.submit(narrow, time.monotonic() + 10) for _ in range(3)]
        tight = batcher.submit(narrow, time.monotonic() + 0.9)  # the bucket is full now
        with pytest.raises(DeadlineExceeded, match=r"a batch of 4 takes about \d+ ms"):
            tight.result(10)
        assert all(f.result(10).text is not None for f in relaxed)
        assert [shape[0] for shape in runner.shapes] == [3]
        batcher.close()


def test_no_engine_work_for_a_request_that_cannot_meet_its_deadline(parts, widths):
    """Batches take >= 0.3 s: a request with 0.2 s left is dropped unrun at the batch, and
    once the per-request rate is known, admission refuses what the queue cannot answer in
    time (a 503 now instead of a 504 later)."""
    path, spec = parts
    narrow, _ = widths
    runner = SlowRunner(path, 0.3)
    with Recognizer(runner, spec) as recognizer:
        batcher = WidthBatcher(recognizer, max_batch_size=4, max_wait_s=0.0, max_queue=64)
        batcher.start()
        batcher.reserve(1, time.monotonic() + 10)
        assert batcher.submit(narrow, time.monotonic() + 10).result(10).text is not None
        assert batcher.expected_batch_seconds(1) >= 0.3 and batcher.request_seconds >= 0.3
        runner.shapes.clear()
        batcher.reserve(1)
        hopeless = batcher.submit(narrow, time.monotonic() + 0.2)
        with pytest.raises(DeadlineExceeded, match="would pass before its batch is answered"):
            hopeless.result(10)
        assert runner.shapes == []  # never reached the engine
        batcher.reserve(4)  # four queued at >= 0.3 s each: >= 1.2 s of wait
        with pytest.raises(QueueFull, match="expected wait .* would pass the request's deadline"):
            batcher.reserve(1, time.monotonic() + 0.5)
        batcher.reserve(1, time.monotonic() + 30)  # room and time enough
        batcher.release(5)
        batcher.close()


class BrokenOnceRunner(OnnxRuntimeRunner):
    """Test double: the real ONNX Runtime runner, raising a plain RuntimeError (a bug, not an
    EngineError) on its first call only."""

    calls = 0

    def infer(self, feed):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("test double: a bug in the detector's engine call")
        return super().infer(feed)


def test_a_detector_bug_fails_its_batch_and_the_engine_thread_keeps_serving(ppocr_det_path):
    from pipeline.detector import Detector
    from preprocess.image import detector_input

    _, spec = open_model(ppocr_det_path, expect=DetectorSpec)
    detector = Detector(BrokenOnceRunner(ppocr_det_path), spec).load()
    line = render_line(["OPEN", "DAILY"])[0]
    pixels = detector_input(line, spec)
    size = (line.shape[1], line.shape[0])
    batcher = DetectorBatcher(detector, max_batch_size=2, max_wait_s=0.01, max_queue=8)
    batcher.start()
    try:
        batcher.reserve(2)
        with pytest.raises(EngineFailed, match="a bug in the detector"):
            batcher.submit(pixels, time.monotonic() + 10, size).result(10)
        boxes = batcher.submit(pixels, time.monotonic() + 10, size).result(10)
    finally:
        batcher.close()
    assert boxes  # the second request was served by the same, still running, thread


class ConcurrencyRunner(OnnxRuntimeRunner):
    """Test double: the real ONNX Runtime runner, holding each call 0.2 s longer and
    recording how many calls were in it at once and each call's batch size."""

    def __init__(self, path):
        super().__init__(path, threads=1)
        self.inside = 0
        self.most_inside = 0
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def infer(self, feed):
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.sizes.append(next(iter(feed.values())).shape[0])
        try:
            time.sleep(0.2)
            return super().infer(feed)
        finally:
            with self._lock:
                self.inside -= 1


def test_two_lanes_run_two_widths_at_once_with_batch_1_answers(parts):
    path, spec = parts
    runner = ConcurrencyRunner(path)
    images = [pixels_of_width(spec, w, 40 * len(w)) for w in
              ("abc", "hello", "serving", "widest words")]
    with Recognizer(runner, spec) as recognizer:
        expected = [recognizer([p])[0].text for p in images]
        runner.most_inside = 0
        batcher = WidthBatcher(recognizer, max_batch_size=8, max_wait_s=0.0, max_queue=16,
                               lanes=2)
        futures = [batcher.submit(p, time.monotonic() + 10) for p in images]
        batcher.start()
        texts = [f.result(10).text for f in futures]
        # admission counts the lanes: the queue ahead drains at twice the per-request rate,
        # and the last batch (a lane's share, here the full 8, answered together) runs on
        # one lane
        assert batcher.request_seconds > 0
        ahead = batcher.depth + 20  # (this test submitted without reserving: depth < 0)
        assert ahead >= 16 and batcher.share(ahead) == 8
        assert batcher.expected_wait(20) == pytest.approx(
            (ahead - 8) * batcher.request_seconds / 2 + batcher.expected_batch_seconds(8))
        assert batcher.expected_batch_seconds(8) == pytest.approx(
            8 * batcher.request_seconds + batcher.tail_seconds)
        batcher.close(timeout=5)
    assert texts == expected
    assert runner.most_inside == 2  # two engine calls at once
    assert not any(t.is_alive() for t in batcher._threads)


def test_two_lanes_split_a_queued_width_instead_of_one_lane_taking_it_all(parts):
    """Eight requests of one width queued, two lanes, batches of up to 8: no batch takes
    more than a lane's share of the queue (4 of 8, then 2 of the 4 left, ...) and the two
    lanes run at once, instead of one batch of 8 on one lane while the other has nothing
    to run."""
    path, spec = parts
    narrow = pixels_of_width(spec, "word", 96)
    runner = ConcurrencyRunner(path)
    with Recognizer(runner, spec) as recognizer:
        expected = recognizer([narrow])[0].text
        runner.most_inside, runner.sizes = 0, []
        batcher = WidthBatcher(recognizer, max_batch_size=8, max_wait_s=0.0, max_queue=16,
                               lanes=2)
        assert [batcher.share(n) for n in (1, 2, 3, 8, 16, 40)] == [1, 1, 2, 4, 8, 8]
        futures = [batcher.submit(narrow, time.monotonic() + 10) for _ in range(8)]
        batcher.start()
        texts = [f.result(10).text for f in futures]
        batcher.close(timeout=5)
    assert texts == [expected] * 8
    assert max(runner.sizes) == 4 and sum(runner.sizes) == 8 and len(runner.sizes) > 2
    assert runner.most_inside == 2


def test_one_image_requests_go_first_come_first_served_across_widths(parts, widths):
    """Batches of 1: the bucket with more requests queued gains nothing from its size, so
    requests go in the order they came, whatever their widths; once every request has
    waited past the batcher's patience, one-image requests (whose fair-queueing tags tie)
    still go in the order they came."""
    path, spec = parts
    narrow, wide = widths
    runner = RecordingRunner(path)
    with Recognizer(runner, spec) as recognizer:
        runner.shapes.clear()
        # patience is 10 x max_wait_s = 1 s here, and a bucket of 1 is full (due) at once
        batcher = WidthBatcher(recognizer, max_batch_size=1, max_wait_s=0.1, max_queue=16)
        futures = [batcher.submit(p, time.monotonic() + 30) for p in (wide, narrow, narrow, narrow)]
        batcher.start()
        for future in futures:
            future.result(10)
        batcher.close()
        fresh = [shape[-1] for shape in runner.shapes]
        runner.shapes.clear()
        batcher = WidthBatcher(recognizer, max_batch_size=1, max_wait_s=0.0, max_queue=16)
        futures = [batcher.submit(p, time.monotonic() + 30) for p in (narrow, wide, narrow, wide)]
        time.sleep(0.1)  # past the 50 ms patience: every bucket is overdue
        batcher.start()
        for future in futures:
            future.result(10)
        batcher.close()
        overdue = [shape[-1] for shape in runner.shapes]
    n, w = narrow.shape[1], wide.shape[1]
    assert fresh == [w, n, n, n]
    assert overdue == [n, w, n, w]
