"""The in-memory recogniser: images in, decoded text out, in input order.

``Recognizer(runner, spec)`` is what every caller that recognises crops uses: the folder
evaluation (``eval.evaluate``), the benches, and later the service and the pipeline. It
holds the one recognition loop, :meth:`Recognizer.recognise_batches`: run a batch through
the engine, decode the previous batch on a worker thread meanwhile (CTC decoding overlaps
the engine), and hand results back in order. Batches are split to sizes the engine accepts
(an .om's batch range). ``Recognizer(images)`` prepares each image with the model's
description (``preprocess.image``), groups equal widths (``preprocess.batching``, no
padding, so a result equals the batch-1 result), and scatters results back through the
plan, so output order is input order (PaddleOCR ``predict_rec``'s argsort, without its
padding).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from common.errors import EngineError, ToolchainError
from infer.base import Runner
from models.ctc import DECODERS, Decoded, decode_output, most_confident
from models.spec import ModelSpec
from preprocess.batching import batch_inputs
from preprocess.image import SampleError, prepare_readings


@dataclass(frozen=True)
class Recognition:
    """One recognised image.

    Attributes:
        text: the decoded string (the model's charset, case kept).
        confidence: see :class:`models.ctc.Decoded`.
        char_frames: CTC frame of each character (greedy decoding; empty for beam).
        frames: frames the model produced for this image.
        width: the model input's width in pixels (after the width policy).
        size: the original image's ``(width, height)`` in pixels.
        turn: the quarter turn of the reading kept (``models.spec.TURNS``: 0 upright, 1
            counter-clockwise, -1 clockwise); 0 unless the model reads tall crops turned.
    """

    text: str
    confidence: float
    char_frames: tuple[int, ...]
    frames: int
    width: int
    size: tuple[int, int]
    turn: int = 0

    @classmethod
    def of(cls, decoded: Decoded, width: int, size: tuple[int, int], turn: int = 0) -> Recognition:
        """The recognition of one decoded row whose input was ``width`` pixels wide, from an
        image of ``size`` ``(width, height)`` read turned by ``turn``."""
        return cls(decoded.text, decoded.confidence, decoded.char_frames, decoded.frames, width,
                   size, turn)


@dataclass(frozen=True)
class Failure:
    """An image that produced no text: ``stage`` is ``"decode"`` (the image) or ``"infer"``."""

    reason: str
    stage: str


@dataclass
class BatchResult:
    """What :meth:`Recognizer.recognise_batches` yields for one batch.

    Attributes:
        key: the caller's key for the batch, passed through.
        decoded: one :class:`models.ctc.Decoded` per row, or None when the engine failed.
        error: the engine's failure (then ``decoded`` is None).
        engine_seconds: time in the engine call(s) alone.
        decode_seconds: time spent in CTC decoding (on the worker thread).
    """

    key: Any
    decoded: list[Decoded] | None
    error: EngineError | None = None
    engine_seconds: float = 0.0
    decode_seconds: float = 0.0


def engine_lanes(backend: str, device: str | None, lanes: int | None = None,
                 threads: int | None = None) -> tuple[int, int | None]:
    """Engine lanes and intra-op threads per lane for one process.

    ``lanes``/``threads`` as given; with neither, ONNX Runtime on the CPU gets one lane per
    core with one thread each (``bench.e2e``: 2 one-thread lanes beat one 2-thread call on
    2 cores, since the LSTM's time steps leave a second thread idle), anything else one lane
    with the backend's default threads.

    Args:
        backend: the backend's name (``models.backends``).
        device: the device given (None: the backend's default).
    """
    if lanes is not None or threads is not None:
        return lanes or 1, threads
    if backend == "onnxruntime" and (device or "cpu") == "cpu":
        from infer.onnxruntime_runner import available_cores

        return available_cores(), 1
    return 1, None


@dataclass
class Recognizer:
    """Recognise word images with a runner and its model description.

    Args:
        runner: the backend (``infer.open_model``); loaded by :meth:`load` or ``with``.
        spec: the model description (names, preprocessing, frames rule, charset).
        batch_size: images per batch for :meth:`__call__`.
        decoder: ``"greedy"`` or ``"beam"``.
        beam_width: prefixes kept per frame by beam search (>= 1).
        lanes: engine calls in flight at once in :meth:`recognise_batches` (>= 1). With
            ``lanes > 1`` each batch runs its engine call and its CTC decoding on one of
            ``lanes`` threads, so several batches are in the engine together (on CPU, N
            one-thread lanes keep N cores busier than one N-thread call: the LSTM's steps are
            sequential). The runner must allow concurrent calls
            (:attr:`infer.base.Runner.concurrent_infer`). Each batch's result is the same
            as with one lane; results come back in the order given either way.

    Raises:
        ToolchainError: an unknown decoder, ``beam_width < 1``, ``batch_size < 1``,
            ``lanes < 1``, or ``lanes > 1`` with a runner that cannot run concurrently.
    """

    runner: Runner
    spec: ModelSpec
    batch_size: int = 16
    decoder: str = "greedy"
    beam_width: int = 10
    lanes: int = 1
    _engine_batch: int | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _lane_pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ToolchainError(f"decoder {self.decoder!r} is unknown; use one of {DECODERS}")
        if self.beam_width < 1:
            raise ToolchainError(f"beam width must be >= 1, got {self.beam_width}")
        if self.batch_size < 1:
            raise ToolchainError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lanes < 1:
            raise ToolchainError(f"engine lanes must be >= 1, got {self.lanes}")
        if self.lanes > 1 and not self.runner.concurrent_infer:
            raise ToolchainError(f"the {self.runner.name} backend runs one batch at a time; "
                                 f"use 1 engine lane (got {self.lanes})")

    def load(self) -> Recognizer:
        """Load the runner, read the largest batch its engine accepts, start the decode thread."""
        self.runner.load()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctc-decode")
        if self.lanes > 1 and self._lane_pool is None:
            self._lane_pool = ThreadPoolExecutor(max_workers=self.lanes,
                                                 thread_name_prefix="engine-lane")
        specs = {s.name: s for s in self.runner.input_specs()}
        if self.spec.input_name not in specs:
            raise ToolchainError(f"the model's input is not {self.spec.input_name!r} as its "
                                 f"description says; inputs are: {', '.join(specs)}")
        batch_range = (specs[self.spec.input_name].ranges or {}).get(0)
        self._engine_batch = batch_range[1] if batch_range else None
        return self

    def close(self) -> None:
        """Release the runner, the decode thread and the lane threads."""
        for pool in (self._pool, self._lane_pool):
            if pool is not None:
                pool.shutdown()
        self._pool = self._lane_pool = None
        self.runner.close()

    def __enter__(self) -> Recognizer:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def check_widths(self, widths: Sequence[int]) -> None:
        """Refuse input widths the loaded engine cannot take, before any inference.

        Raises:
            ToolchainError: some widths fall outside the engine's width range; the message
                names how many, the range, and the fixes.
        """
        spec = {s.name: s for s in self.runner.input_specs()}[self.spec.input_name]
        low, high = (spec.ranges or {}).get(3, (self.spec.min_input_width, 1 << 30))
        outside = sorted({w for w in widths if not low <= w <= high})
        if outside:
            count = sum(1 for w in widths if not low <= w <= high)
            raise ToolchainError(
                f"{count} inputs have widths ({outside[0]}..{outside[-1]} px) outside the "
                f"model's width range {low}~{high}; preprocess with --min-width/--max-width "
                f"inside it (or give parse_testdata the model file: --model), or rebuild the "
                f"model for a wider range (convert.atc --min-width/--max-width)")

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """The model's output for an input batch, split to sizes the engine accepts.

        Args:
            batch: float32 ``spec.input_shape(N, W)``.

        Returns:
            The output ``spec.output_shape(N, W)`` and the seconds spent in the engine.

        Raises:
            EngineError: the engine failed.
            ToolchainError: the batch does not fit the model (shape, dtype, width range).
        """
        step = self._engine_batch or batch.shape[0]
        pieces, seconds = [], 0.0
        for start in range(0, batch.shape[0], step):
            outputs = self.runner.infer({self.spec.input_name: batch[start:start + step]})
            seconds += self.runner.last_engine_seconds
            pieces.append(outputs[self.spec.output_name])
        if len(pieces) == 1:
            return pieces[0], seconds
        return np.concatenate(pieces, axis=self.spec.batch_axis), seconds

    def _decode(self, key: Any, scores: np.ndarray, widths: list[int],
                engine_seconds: float) -> BatchResult:
        start = time.perf_counter()
        decoded = decode_output(self.spec, scores, widths, self.decoder, self.beam_width)
        return BatchResult(key, decoded, None, engine_seconds, time.perf_counter() - start)

    def submit(self, key: Any, batch: np.ndarray, widths: Sequence[int]) -> Future:
        """Run the engine on one batch now, on this thread, and decode it on the decode thread.

        The caller may go on to the next batch while this one decodes (one decode thread, so
        results complete in submission order).

        Args:
            key: the caller's key for the batch, passed through to the result.
            batch: float32 ``spec.input_shape(N, W)``.
            widths: the unpadded input width of each row, in pixels.

        Returns:
            A ``concurrent.futures.Future`` of a :class:`BatchResult`; an engine failure
            (:class:`EngineError`) is its ``error``, already set. Any other exception is a bug
            and propagates (from this call, or from the future for the decoder).

        Raises:
            ToolchainError: not loaded, or the batch does not fit the model.
        """
        if self._pool is None:
            raise ToolchainError("Recognizer: call load() (or use `with`) before recognising")
        try:
            scores, engine_seconds = self.forward(batch)
        except EngineError as exc:
            failed: Future = Future()
            failed.set_result(BatchResult(key, None, exc))
            return failed
        return self._pool.submit(self._decode, key, scores, list(widths), engine_seconds)

    def recognise_batches(
        self, batches: Iterable[tuple[Any, np.ndarray, Sequence[int]]],
    ) -> Iterator[BatchResult]:
        """The recognition loop: with one lane, the engine on this thread and CTC decoding on a
        worker thread; with ``lanes > 1``, each batch's engine call and decoding on the next
        free lane thread, ``lanes`` batches at once, one more queued.

        Args:
            batches: ``(key, float32 input batch, unpadded width of each row)``.

        Yields:
            One :class:`BatchResult` per batch, in the order given (see :meth:`submit`).
        """
        if self._pool is None:
            raise ToolchainError("Recognizer: call load() (or use `with`) before recognising")
        pending: deque[Future] = deque()
        if self._lane_pool is None:
            for key, batch, widths in batches:
                pending.append(self.submit(key, batch, widths))
                while len(pending) > 1:  # one decode in flight beside the next engine call
                    yield pending.popleft().result()
        else:
            try:
                for key, batch, widths in batches:
                    pending.append(self._lane_pool.submit(self._lane, key, batch, list(widths)))
                    while len(pending) > self.lanes:  # every lane busy, one batch waiting
                        yield pending.popleft().result()
            except BaseException:  # an early close or an error: no queued batch runs for nobody
                for future in pending:
                    future.cancel()
                raise
        while pending:
            yield pending.popleft().result()

    def _lane(self, key: Any, batch: np.ndarray, widths: list[int]) -> BatchResult:
        """One batch on an engine lane: the engine call, then its CTC decoding."""
        try:
            scores, engine_seconds = self.forward(batch)
        except EngineError as exc:
            return BatchResult(key, None, exc)
        return self._decode(key, scores, widths, engine_seconds)

    def read(
        self, readings: Sequence[Sequence[tuple[int, np.ndarray]]],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Recognition | Failure]:
        """The reading loop: recognise prepared images, each given as its readings, and give one
        answer per image (:func:`collapse`).

        Args:
            readings: per image, ``(quarter turn, uint8 pixels [H, W] or [H, W, C])`` pairs,
                prepared for ``spec`` (``preprocess.image.prepare_readings``): one, or three
                for a tall crop the description reads turned.
            sizes: each image's original ``(width, height)`` in pixels (default: its first
                reading's).

        Returns:
            One :class:`Recognition` or :class:`Failure` (``stage="infer"``) per image, in
            order.
        """
        pixels, origin, turns = [], [], []
        for position, image_readings in enumerate(readings):
            if not image_readings:
                raise ToolchainError(f"image {position} has no reading to recognise")
            for turn, resized in image_readings:
                pixels.append(resized)
                origin.append(position)
                turns.append(turn)
        if sizes is None:
            sizes = [(r[0][1].shape[1], r[0][1].shape[0]) for r in readings]
        planned = batch_inputs(pixels, self.spec, self.batch_size)
        batches = (
            (members, batch, [pixels[m].shape[1] for m in members]) for members, batch in planned
        )
        readings_of: dict[int, list[tuple[int, Recognition | Failure]]] = {}
        for result in self.recognise_batches(batches):
            for row, member in enumerate(result.key):
                if result.error is not None:
                    reading = Failure(str(result.error), "infer")
                else:
                    reading = Recognition.of(result.decoded[row], pixels[member].shape[1],
                                             sizes[origin[member]], turns[member])
                readings_of.setdefault(origin[member], []).append((turns[member], reading))
        return [collapse(readings_of[position]) for position in range(len(readings))]

    def __call__(
        self, images: Sequence[bytes | Image.Image | np.ndarray],
    ) -> list[Recognition | Failure]:
        """Recognise images.

        Args:
            images: encoded image bytes (any format Pillow reads), Pillow images, or uint8
                pixels (``[H, W]`` grey or ``[H, W, 3]`` RGB).

        Returns:
            One :class:`Recognition` or :class:`Failure` per image, in input order: an image
            that does not decode is a ``Failure`` of stage ``"decode"``; the rest go through
            :meth:`read` (a tall crop the description reads turned is read three ways, and
            its most confident reading kept).
        """
        results: list[Recognition | Failure | None] = [None] * len(images)
        prepared, sizes, positions = [], [], []
        for position, image in enumerate(images):
            try:
                readings, size = prepare_readings(image, self.spec)
            except SampleError as exc:
                results[position] = Failure(str(exc), "decode")
                continue
            prepared.append(readings)
            sizes.append(size)
            positions.append(position)
        for position, result in zip(positions, self.read(prepared, sizes)):
            results[position] = result
        return results


R = TypeVar("R")


def collapse(readings: Sequence[tuple[int, R | Failure]]) -> R | Failure:
    """One image's answer from its readings: the first :class:`Failure` if any reading failed
    (the image is recorded as failed, never silently read from fewer readings), else the most
    confident reading (``models.ctc.most_confident``: ties go upright, then
    counter-clockwise).

    Args:
        readings: ``(quarter turn, reading or Failure)`` pairs; a reading has a
            ``confidence``.

    Raises:
        ValueError: no reading.
    """
    for _, reading in readings:
        if isinstance(reading, Failure):
            return reading
    return most_confident(readings)
