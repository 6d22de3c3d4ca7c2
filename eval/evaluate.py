"""The folder evaluation: read input batches, recognise them, keep per-sample results; timed.

Reading runs ahead on a background thread (``eval.inputs``); the engine and CTC decoding
are the in-memory recogniser's loop (``pipeline.Recognizer.recognise_batches``), decoding
on another thread, so both overlap the engine. ``e2e_seconds`` is the wall time from the
first input read to the last decoded sample, warm-up excluded; ``stages`` are the seconds
each stage spent (they overlap, so they can add up to more than ``e2e_seconds``).
``engine_seconds_sum`` is the ModelZoo postprocess's "E2E time" (the sum of engine calls),
kept for comparison. A batch the engine rejects (:class:`common.errors.EngineError`) is
recorded against each of its samples; any other error stops the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from common.errors import EngineError
from eval.inputs import InputSet
from pipeline.recognizer import Failure, Recognizer, collapse

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One decoded sample: its reading kept (``turn``, ``models.spec.TURNS``; 0 unless the
    model reads tall crops turned) and that reading's input width."""

    index: int
    label: str
    prediction: str
    confidence: float
    width: int
    turn: int = 0


@dataclass
class EvalRun:
    """What one evaluation produced, before scoring."""

    predictions: list[Prediction]
    failed: list[dict]
    e2e_seconds: float
    stages: dict[str, float]
    batch_latencies: list[float] = field(default_factory=list)
    #: lmdb index -> position of its batch in ``batch_latencies`` (scored samples).
    batch_of: dict[int, int] = field(default_factory=dict)

    @property
    def engine_seconds_sum(self) -> float:
        return float(sum(self.batch_latencies))


def run_evaluation(recognizer: Recognizer, inputs: InputSet, warmup: int = 1,
                   progress: bool = False) -> EvalRun:
    """Run every input batch of an input folder through a loaded ``recognizer``.

    See :func:`run_batches`; the batches are the folder's files, read ahead. Widths the
    engine cannot take are refused first (:meth:`Recognizer.check_widths`).
    """
    recognizer.check_widths([s.width for s in inputs.samples])
    return run_batches(recognizer, inputs.batches(), len(inputs.samples), warmup, progress)


def run_batches(recognizer: Recognizer, batches: Iterator[tuple[np.ndarray, list, float]],
                total: int, warmup: int = 1, progress: bool = False) -> EvalRun:
    """Run input batches through a loaded ``recognizer`` and keep per-sample results.

    Args:
        recognizer: loaded; its description gives the frames per width and the decoding.
        batches: ``(float32 input batch, samples, seconds spent reading it)``; each sample
            has ``index``, ``label``, ``width`` and ``turn`` (``eval.inputs.Sample``,
            ``preprocess.stream.StreamedSample``). An index may come in several readings
            (turns, in any batches): the most confident is kept
            (``pipeline.recognizer.collapse``), and if any of its readings failed in the
            engine, the sample is recorded as failed instead.
        total: number of samples expected (for the progress bar).
        warmup: untimed runs of the first batch before timing starts; an engine failure
            there is logged and left to the timed run to record.
        progress: show a tqdm bar.

    Returns:
        Predictions in index order (one per index), inference failures (each sample of a
        batch the engine rejected, with the reason, once), and timings.
    """
    first = next(batches, None)
    stages = {"read": 0.0, "engine": 0.0, "decode": 0.0}
    if first is None:
        return EvalRun([], [], 0.0, stages)
    for _ in range(warmup):
        try:
            recognizer.forward(first[0])
        except EngineError as exc:
            log.warning("warm-up failed (%s); the timed run records it", exc)
            break
    bar = tqdm(total=total, unit="img", desc="infer",
               disable=None if progress else True)
    latencies: list[float] = []
    readings: dict[int, list[tuple[int, Prediction | Failure]]] = {}
    batch_of_reading: dict[tuple[int, int], int] = {}  # (index, turn) -> batch number

    def feed():
        stages["read"] += first[2]
        yield first[1], first[0], [s.width for s in first[1]]
        for array, samples, read_seconds in batches:
            stages["read"] += read_seconds
            yield samples, array, [s.width for s in samples]

    start = time.perf_counter()
    for result in recognizer.recognise_batches(feed()):
        samples = result.key
        bar.update(len(samples))
        if result.error is not None:
            failure = Failure(f"inference failed: {result.error}", "infer")
            for s in samples:
                readings.setdefault(s.index, []).append((s.turn, failure))
            continue
        latencies.append(result.engine_seconds)
        stages["decode"] += result.decode_seconds
        for s, d in zip(samples, result.decoded):
            readings.setdefault(s.index, []).append(
                (s.turn, Prediction(s.index, s.label, d.text, d.confidence, s.width, s.turn)))
            batch_of_reading[s.index, s.turn] = len(latencies) - 1
    answers = {index: collapse(found) for index, found in sorted(readings.items())}
    failed = [{"index": index, "reason": answer.reason, "stage": answer.stage}
              for index, answer in answers.items() if isinstance(answer, Failure)]
    predictions = [answer for answer in answers.values() if not isinstance(answer, Failure)]
    batch_of = {p.index: batch_of_reading[p.index, p.turn] for p in predictions}
    e2e = time.perf_counter() - start
    bar.close()
    stages["engine"] = float(sum(latencies))
    return EvalRun(predictions, failed, e2e, stages,
                   latencies, batch_of)
