"""The evaluation loop: read inputs, run the engine, decode, score; timed per stage.

Reading runs ahead on a background thread and decoding on another, so both overlap the
engine. ``e2e_seconds`` is the wall time from the first input read to the last decoded
sample, warm-up excluded; ``stages`` are the seconds each stage spent (they overlap, so
they can add up to more than ``e2e_seconds``). ``engine_seconds_sum`` is the ModelZoo
postprocess's "E2E time" (the sum of engine calls), kept for comparison.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from convert.spec import ModelSpec
from eval.ctc import DECODERS, Decoded
from eval.inputs import InputSet, Sample
from infer.base import Runner


@dataclass
class Prediction:
    """One decoded sample."""

    index: int
    label: str
    prediction: str
    confidence: float
    width: int


@dataclass
class EvalRun:
    """What one evaluation produced, before scoring."""

    predictions: list[Prediction]
    failed: list[dict]
    e2e_seconds: float
    stages: dict[str, float]
    batch_latencies: list[float] = field(default_factory=list)

    @property
    def engine_seconds_sum(self) -> float:
        return float(sum(self.batch_latencies))


def _decode(logits: np.ndarray, samples: list[Sample], spec: ModelSpec, decoder: str,
            beam_width: int) -> tuple[list[Decoded], float]:
    start = time.perf_counter()
    lengths = [spec.frames(s.width) for s in samples]
    kwargs = {"beam_width": beam_width} if decoder == "beam" else {}
    decoded = DECODERS[decoder](logits, spec.alphabet, spec.blank, time_major=True,
                                lengths=lengths, **kwargs)
    return decoded, time.perf_counter() - start


def run_evaluation(runner: Runner, inputs: InputSet, spec: ModelSpec, decoder: str = "greedy",
                   beam_width: int = 10, warmup: int = 1, input_name: str = "imgs",
                   output_name: str = "output1", progress: bool = False) -> EvalRun:
    """Run every input batch of ``inputs`` through a loaded ``runner`` and decode it.

    Args:
        runner: a loaded backend.
        inputs: the input folder's contents.
        spec: model description used for frames per width and decoding.
        decoder: ``"greedy"`` or ``"beam"``.
        warmup: untimed runs of the first batch before timing starts.

    Returns:
        Predictions in index order, inference failures (each sample of a batch the engine
        rejected, with the reason), and timings.
    """
    batches = inputs.batches()
    first = next(batches, None)
    if first is None:
        return EvalRun([], [], 0.0, {"read": 0.0, "engine": 0.0, "decode": 0.0})
    for _ in range(warmup):
        try:
            runner.infer({input_name: first[0]})
        except Exception:  # noqa: BLE001 - the timed run below records the reason
            break
    stages = {"read": 0.0, "engine": 0.0, "decode": 0.0}
    latencies: list[float] = []
    failed: list[dict] = []
    pending: list[tuple[Future, list[Sample]]] = []
    bar = tqdm(total=len(inputs.samples), unit="img", desc="infer",
               disable=None if progress else True)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctc-decode") as decode_pool:
        for array, samples, read_seconds in itertools.chain([first], batches):
            stages["read"] += read_seconds
            try:
                outputs = runner.infer({input_name: array})
            except Exception as exc:  # engines raise their own types; record, don't stop
                reason = f"inference failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                failed += [{"index": s.index, "reason": reason, "stage": "infer"} for s in samples]
                bar.update(len(samples))
                continue
            latencies.append(runner.last_engine_seconds)
            pending.append((decode_pool.submit(_decode, outputs[output_name], samples, spec,
                                               decoder, beam_width), samples))
            bar.update(len(samples))
        predictions = []
        for future, samples in pending:
            decoded, seconds = future.result()
            stages["decode"] += seconds
            predictions += [Prediction(s.index, s.label, d.text, d.confidence, s.width)
                            for s, d in zip(samples, decoded)]
    e2e = time.perf_counter() - start
    bar.close()
    stages["engine"] = float(sum(latencies))
    predictions.sort(key=lambda p: p.index)
    return EvalRun(predictions, failed, e2e, stages, latencies)
