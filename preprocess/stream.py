"""Read an lmdb test set into model input batches in memory, decoding in worker processes.

:func:`decode_all` decodes and resizes every index 1..N (``preprocess.image``) in ``workers``
processes and yields per-sample results as they arrive. :func:`stream_batches` groups them
into equal-width buckets and hands out a batch as soon as a bucket is full (the rest when
the set is read), so inference can start while decoding goes on and no .npy files are
written. One width per batch means nothing is padded: a batch's results equal batch-1
results, whatever the arrival order. Samples that cannot be used are collected with their
reasons, never dropped.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.spec import ModelSpec
from preprocess.batching import batch_inputs
from preprocess.image import SampleError, decode_label, prepare
from preprocess.lmdb_reader import Survey, open_lmdb, read_sample, survey

CHUNK = 64  # indices per task sent to a worker

# Per-process state of the decode workers (set by _init_worker).
_worker: dict[str, object] = {}


def _start_pool(workers: int, test_dir: Path, spec: ModelSpec):
    """A spawn pool whose workers start with SIGINT ignored.

    An ignored signal stays ignored across ``exec``, so a Ctrl-C that arrives while a
    worker is still starting (before its initializer runs) cannot raise in it either.
    """
    context = multiprocessing.get_context("spawn")
    if threading.current_thread() is not threading.main_thread():
        return context.Pool(workers, initializer=_init_pool_worker, initargs=(str(test_dir), spec))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return context.Pool(workers, initializer=_init_pool_worker, initargs=(str(test_dir), spec))
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_pool_worker(test_dir: str, spec: ModelSpec) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates
    # the pool); a worker interrupted inside imap can deadlock Pool.terminate.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(test_dir, spec)


def _init_worker(test_dir: str, spec: ModelSpec) -> None:
    _worker["env"] = open_lmdb(test_dir)
    _worker["spec"] = spec


def decode_indices(txn, spec: ModelSpec, indices: Iterable[int]) -> list[tuple]:
    """Decode and resize the samples at ``indices`` of an open lmdb transaction.

    Returns:
        One tuple per index, ``(index, label, uint8 resized pixels | None, (w, h) | None,
        reason | None)``; a sample that cannot be used has ``reason`` set and no pixels.
    """
    results = []
    for index in indices:
        raw = read_sample(txn, index)
        try:
            label = decode_label(raw.label)
            pixels, size = prepare(raw.image, spec)
        except SampleError as exc:
            results.append((index, None, None, None, str(exc)))
            continue
        results.append((index, label, pixels, size, None))
    return results


def _process(indices: Sequence[int]) -> list[tuple]:
    """Decode and resize a chunk of indices in a worker (:func:`decode_indices`)."""
    with _worker["env"].begin() as txn:
        return decode_indices(txn, _worker["spec"], indices)


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


def decode_all(test_dir: Path, spec: ModelSpec, workers: int) -> tuple[Survey, Iterator[tuple]]:
    """The lmdb's :class:`Survey` and an iterator of per-sample results over the indices
    worth reading (``Survey.readable``), decoded by ``workers`` processes.

    Each result is ``(index, label, uint8 resized pixels | None, (w, h) | None, reason | None)``;
    the indices above them are :func:`missing_range`.
    """
    env = open_lmdb(test_dir)
    found = survey(env, test_dir)
    env.close()
    chunks = _chunks(found.readable, CHUNK)

    def results() -> Iterator[tuple]:
        if workers <= 1:
            _init_worker(str(test_dir), spec)
            try:
                for chunk in chunks:
                    yield from _process(chunk)
            finally:
                _worker.pop("env").close()
            return
        pool = _start_pool(workers, test_dir, spec)
        try:
            for chunk_results in pool.imap_unordered(_process, chunks):
                yield from chunk_results
        finally:  # also on Ctrl-C or an early close: stop the workers and wait for them here,
            pool.terminate()  # not during interpreter shutdown
            pool.join()

    return found, results()


@dataclass(frozen=True)
class StreamedSample:
    """One sample of a streamed batch: lmdb index, label (case kept), resized width."""

    index: int
    label: str
    width: int


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
        workers: decoding processes (1: in this process).

    Raises:
        ToolchainError: ``test_dir`` is not an lmdb, or ``num-samples`` is not an integer.
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    found, results = decode_all(test_dir, spec, workers)
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
        results: :func:`decode_indices` tuples, in any order.
        spec: the model description (normalisation).
        batch_size: samples per batch (>= 1); the rest of each width comes at the end,
            narrowest first.
        failed: ``{"index", "reason"}`` of each unusable sample is appended here.

    Yields:
        ``(float32 [B, C, H, W], samples, seconds spent waiting for ``results``)``.
    """
    def make(members: list[tuple[int, str, np.ndarray]]) -> tuple[np.ndarray, list]:
        ((_, batch),) = batch_inputs([pixels for _, _, pixels in members], spec, len(members))
        return batch, [StreamedSample(i, label, pixels.shape[1]) for i, label, pixels in members]

    buckets: dict[int, list[tuple[int, str, np.ndarray]]] = {}
    waited = 0.0
    start = time.perf_counter()
    for index, label, pixels, _size, reason in results:
        if reason is not None:
            failed.append({"index": index, "reason": reason})
            continue
        bucket = buckets.setdefault(pixels.shape[1], [])
        bucket.append((index, label, pixels))
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
