"""Read an lmdb test set into model input batches in memory, decoding in worker threads.

:func:`decode_all` decodes and resizes every index 1..N (``preprocess.image``) in ``workers``
threads and yields per-sample results in index order. :func:`stream_batches` groups them
into equal-width buckets and hands out a batch as soon as a bucket is full (the rest when
the set is read), so inference can start while decoding goes on and no .npy files are
written. One width per batch means nothing is padded, and since the results come in index
order, each batch holds the same samples as ``preprocess.batching.plan_batches`` gives the
two-step path (only the order of the batches differs). A crop the model reads turned
(``models.spec.ModelSpec.tall_crops``) gives one row per reading, tagged with its turn;
the caller keeps the most confident (``eval.evaluate.run_batches``). Samples that cannot be
used are collected with their reasons, never dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from models.spec import ModelSpec
from preprocess.batching import batch_inputs
from preprocess.image import SampleError, decode_label, prepare_readings
from preprocess.lmdb_reader import Survey, open_lmdb, read_sample, survey

CHUNK = 64  # indices per decoding task
READ_AHEAD = 4  # tasks queued per decoding thread, bounding memory ahead of the consumer


def decode_indices(txn, spec: ModelSpec, indices: Iterable[int],
                   turns: bool = False) -> list[tuple]:
    """Decode and resize the samples at ``indices`` of an open lmdb transaction.

    Args:
        txn: an open lmdb read transaction.
        spec: the model description.
        indices: lmdb indices (1-based).
        turns: also give the turned readings of the crops the description reads turned
            (``preprocess.image.prepare_readings``); False: the upright reading only.

    Returns:
        One tuple per reading, ``(index, label, uint8 resized pixels | None, (w, h) | None,
        reason | None, turn)``, the upright reading (turn 0) of each index first; a sample
        that cannot be used has one tuple, with ``reason`` set, no pixels and turn 0.
    """
    results = []
    reading_spec = spec if turns or spec.tall_crops == "keep" else spec.replace(tall_crops="keep")
    for index in indices:
        try:
            raw = read_sample(txn, index)
        except lmdb.Error as exc:  # a damaged page under this sample's keys
            results.append((index, None, None, None, f"unreadable lmdb entry ({exc})", 0))
            continue
        try:
            label = decode_label(raw.label)
            readings, size = prepare_readings(raw.image, reading_spec)
        except SampleError as exc:
            results.append((index, None, None, None, str(exc), 0))
            continue
        results.extend((index, label, pixels, size, None, turn) for turn, pixels in readings)
    return results



def _chunks(count: int, size: int) -> Iterator[list[int]]:
    for start in range(1, count + 1, size):
        yield list(range(start, min(start + size, count + 1)))


def missing_range(found: Survey) -> dict | None:
    """One failure record for the indices above the largest key present, or None.

    ``{"index": first, "last": last, "count": n, "reason": ...}``: a ``num-samples`` far
    beyond the keys is accounted for in constant time and memory, not one record each.
    """
    if found.num_samples <= found.largest:
        return None
    first, last = found.largest + 1, found.num_samples
    return {"index": first, "last": last, "count": last - first + 1,
            "reason": f"no image or label key (num-samples is {found.num_samples}, the largest "
                      f"index present is {found.largest})"}


def decode_all(test_dir: Path, spec: ModelSpec, workers: int,
               turns: bool = False) -> tuple[Survey, Iterator[tuple]]:
    """The lmdb's :class:`Survey` and an iterator of per-sample results over the indices
    worth reading (``Survey.readable``), in index order, decoded by ``workers`` threads
    (with the turned readings where ``turns``: see :func:`decode_indices`).

    Pillow releases the GIL while it inflates, converts and resizes, so threads decode in
    parallel with no process to start and no pixels to pickle; results come in index order
    whatever the threads' timing, so everything batched from them is deterministic.

    Each result is a :func:`decode_indices` tuple; the indices above them are
    :func:`missing_range`.
    """
    env = open_lmdb(test_dir)
    found = survey(env, test_dir)
    env.close()
    chunks = _chunks(found.readable, CHUNK)

    def results() -> Iterator[tuple]:
        env = open_lmdb(test_dir)  # opened here, so an iterator never started holds nothing

        def decode(indices: list[int]) -> list[tuple]:
            with env.begin() as txn:
                return decode_indices(txn, spec, indices, turns)

        try:
            if workers <= 1:
                for chunk in chunks:
                    yield from decode(chunk)
                return
            pending: deque[Future] = deque()
            with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
                try:
                    for chunk in chunks:
                        pending.append(pool.submit(decode, chunk))
                        if len(pending) >= workers * READ_AHEAD:
                            yield from pending.popleft().result()
                    while pending:
                        yield from pending.popleft().result()
                finally:  # on Ctrl-C or an early close: drop what has not started; the
                    for future in pending:  # pool's exit waits for the running tasks
                        future.cancel()
        finally:
            env.close()  # after every thread is done with it

    return found, results()


@dataclass(frozen=True)
class StreamedSample:
    """One reading of a streamed batch: lmdb index, label (case kept), resized width, and
    the quarter turn of the reading (``models.spec.TURNS``)."""

    index: int
    label: str
    width: int
    turn: int = 0


@dataclass
class Stream:
    """What :func:`stream_batches` reads.

    Attributes:
        count: ``num-samples`` of the lmdb.
        batches: ``(float32 [B, C, H, W], samples, seconds this batch waited for decoding)``;
            consume it once.
        failed: ``{"index", "reason"}`` of every sample that could not be used, complete
            once ``batches`` is exhausted.
    """

    count: int
    batches: Iterator[tuple[np.ndarray, list[StreamedSample], float]]
    failed: list[dict] = field(default_factory=list)
    synthetic: bool = False


def stream_batches(test_dir: Path, spec: ModelSpec, batch_size: int = 16,
                   workers: int = 1) -> Stream:
    """Equal-width model input batches of an lmdb test set, as decoding produces them.

    Args:
        test_dir: the lmdb folder.
        spec: the model description (colours, height, width policy, normalisation).
        batch_size: samples per batch (>= 1); the last batch of each width may be smaller.
        workers: decoding threads (1: in the calling thread).

    Raises:
        ToolchainError: ``test_dir`` is not an lmdb, or ``num-samples`` is not an integer.
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    found, results = decode_all(test_dir, spec, workers, turns=True)
    stream = Stream(found.num_samples, iter(()), synthetic=found.synthetic)
    missing = missing_range(found)
    if missing:
        stream.failed.append(missing)

    def batches() -> Iterator[tuple[np.ndarray, list[StreamedSample], float]]:
        yield from bucket_batches(results, spec, batch_size, stream.failed)
        stream.failed.sort(key=lambda f: f["index"])

    stream.batches = batches()
    return stream


def bucket_batches(results: Iterable[tuple], spec: ModelSpec, batch_size: int,
                   failed: list[dict]) -> Iterator[tuple[np.ndarray, list[StreamedSample], float]]:
    """Equal-width model input batches of decoded samples, each as soon as its bucket fills.

    Args:
        results: :func:`decode_indices` tuples, in any order (each reading is a row).
        spec: the model description (normalisation).
        batch_size: samples per batch (>= 1); the rest of each width comes at the end,
            narrowest first.
        failed: ``{"index", "reason"}`` of each unusable sample is appended here.

    Yields:
        ``(float32 [B, C, H, W], samples, seconds spent waiting for ``results``)``.
    """
    def make(members: list[tuple[int, str, np.ndarray, int]]) -> tuple[np.ndarray, list]:
        ((_, batch),) = batch_inputs([pixels for _, _, pixels, _ in members], spec, len(members))
        return batch, [StreamedSample(i, label, pixels.shape[1], turn)
                       for i, label, pixels, turn in members]

    buckets: dict[int, list[tuple[int, str, np.ndarray, int]]] = {}
    waited = 0.0
    start = time.perf_counter()
    for index, label, pixels, _size, reason, turn in results:
        if reason is not None:
            failed.append({"index": index, "reason": reason})
            continue
        bucket = buckets.setdefault(pixels.shape[1], [])
        bucket.append((index, label, pixels, turn))
        if len(bucket) == batch_size:
            del buckets[pixels.shape[1]]
            batch, samples = make(bucket)
            waited += time.perf_counter() - start
            yield batch, samples, waited
            waited, start = 0.0, time.perf_counter()
    waited += time.perf_counter() - start
    for width in sorted(buckets):
        batch, samples = make(buckets[width])
        yield batch, samples, waited
        waited = 0.0
