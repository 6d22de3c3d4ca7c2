"""Evaluation in blocks: index ranges of an lmdb test set, each recognised by a worker that
holds the model, and the per-sample results merged back into one run.

Both scale-out executors build on this: Ray Data (``eval.ray_executor``: each block is a Ray
Data block, the workers an actor pool) and one process per NPU on one host
(``eval.devices``). A worker (:class:`BlockWorker`) opens the lmdb and loads the model once,
then for each block decodes and resizes its samples (``preprocess.stream.decode_indices``),
fills equal-width batches (``preprocess.stream.bucket_batches``) and runs them through the
in-memory recogniser (``eval.evaluate.run_batches``), exactly as the one-process path does.
Equal-width batches are never padded, so a sample's prediction does not depend on which
block or batch it landed in: the merged predictions equal the one-process run's.

Each sample comes back as one row (:data:`RESULT_COLUMNS`): scored, or failed with its stage
and reason. A block whose worker died returns nothing; :func:`merge_rows` records each of its
samples as failed with the reason, so the report still accounts for every sample.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from eval.evaluate import EvalRun, Prediction, run_batches
from infer import open_model
from pipeline import Recognizer
from preprocess.lmdb_reader import Survey, open_lmdb, survey
from preprocess.stream import bucket_batches, decode_indices

#: Indices per block (the unit of work a worker receives, and what a worker's death fails).
DEFAULT_BLOCK_SIZE = 256

#: Columns of a result row: lmdb index, label, prediction ("" when failed), confidence,
#: resized width, the reading kept (``turn``, ``models.spec.TURNS``; 0 when failed), failure
#: stage and reason ("" when scored), the worker
#: (``host:pid device``), the block's first index, and the engine seconds of the sample's
#: batch with that batch's number within the worker (``batch``: for latency percentiles).
RESULT_COLUMNS = ("index", "label", "prediction", "confidence", "width", "turn", "stage", "reason",
                  "worker", "block", "batch", "batch_engine_seconds")


@dataclass(frozen=True)
class BlockJob:
    """What every worker needs to recognise blocks of one test set (picklable).

    Attributes:
        test_dir: the lmdb folder, at the same path on every node.
        model: the model file (``.onnx``, ``.om``, ``.pth``), at the same path on every node.
        options: keyword arguments of ``infer.open_model`` (threads, sidecar, arch, ...).
        overrides: description fields to replace (the width options).
        batch_size: samples per equal-width batch.
        decoder, beam_width: CTC decoding (``pipeline.Recognizer``).
    """

    test_dir: str
    model: str
    options: Mapping[str, object] = field(default_factory=dict)
    overrides: Mapping[str, object] = field(default_factory=dict)
    batch_size: int = 16
    decoder: str = "greedy"
    beam_width: int = 10


def plan_blocks(readable: int, block_size: int) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, stop)`` covering ``1..readable``, ``block_size`` each.

    Raises:
        ToolchainError: ``block_size < 1``.
    """
    if block_size < 1:
        raise ToolchainError(f"--block-size must be >= 1, got {block_size}")
    return [(start, min(start + block_size, readable + 1))
            for start in range(1, readable + 1, block_size)]


def survey_test_set(test_dir: Path) -> Survey:
    """The lmdb's :class:`preprocess.lmdb_reader.Survey`, read where the driver runs.

    Raises:
        ToolchainError: not an lmdb, or a bad ``num-samples``.
    """
    env = open_lmdb(test_dir)
    try:
        return survey(env, test_dir)
    finally:
        env.close()


class BlockWorker:
    """Holds an open lmdb and a loaded recogniser; recognises blocks of indices.

    Used as the Ray Data UDF class (called with a batch of blocks) and as the per-NPU
    process's state (:meth:`recognise`).

    Args:
        job: the shared job.
        device: where the model runs (``cpu``, ``cuda``, ``npu:N``; default: the backend's).

    Raises:
        ToolchainError: the lmdb or the model cannot be read here (the message names the
            host), or the model's width range does not cover the width policy.
    """

    def __init__(self, job: BlockJob, device: str | None = None):
        self.job = job
        self.name = f"{socket.gethostname()}:{os.getpid()} {device or 'default device'}"
        try:
            self.env = open_lmdb(job.test_dir)
            runner, spec = open_model(job.model, device, **job.options)
            self.spec = spec.replace(**job.overrides) if job.overrides else spec
            self.recognizer = Recognizer(runner, self.spec, decoder=job.decoder,
                                         beam_width=job.beam_width).load()
            self.recognizer.check_widths(self.spec.policy_widths())
        except ToolchainError as exc:
            raise ToolchainError(f"worker {self.name}: {exc}") from None
        self.batches_done = 0

    def recognise(self, start: int, stop: int) -> dict[str, list]:
        """Result rows (:data:`RESULT_COLUMNS`, as columns) of indices ``start..stop-1``.

        Decoding and inference take turns in the worker (a decoding thread beside the
        engine's threads measured slower on 2 cores); CTC decoding overlaps the engine
        (``pipeline.Recognizer``).
        """
        with self.env.begin() as txn:
            decoded = decode_indices(txn, self.spec, range(start, stop), turns=True)
        failed: list[dict] = []
        batches = bucket_batches(decoded, self.spec, self.job.batch_size, failed)
        run = run_batches(self.recognizer, batches, stop - start, warmup=0)
        return self._rows(start, run, failed)

    def _rows(self, block: int, run: EvalRun, failed_decoding: list[dict]) -> dict[str, list]:
        rows = empty_rows()

        def add(index, label, prediction, confidence, width, turn, stage, reason, batch,
                seconds):
            for name, value in zip(RESULT_COLUMNS, (index, label, prediction, confidence, width,
                                                   turn, stage, reason, self.name, block, batch,
                                                   seconds)):
                rows[name].append(value)

        # run.batch_latencies and the scored predictions come batch by batch in one order;
        # equal widths per batch, so rebuild each sample's batch from run_batches' order.
        for prediction, batch, seconds in _with_batches(run):
            add(prediction.index, prediction.label, prediction.prediction, prediction.confidence,
                prediction.width, prediction.turn, "", "", batch + self.batches_done, seconds)
        self.batches_done += len(run.batch_latencies)
        for failure in failed_decoding:
            add(failure["index"], "", "", 0.0, 0, 0, "preprocess", failure["reason"], -1, 0.0)
        for failure in run.failed:
            add(failure["index"], "", "", 0.0, 0, 0, failure["stage"], failure["reason"], -1,
                0.0)
        return rows

    def __call__(self, blocks: Mapping[str, np.ndarray]) -> dict[str, list]:
        """Ray Data's batch UDF: ``{"start": [...], "stop": [...]}`` in, result columns out."""
        rows = empty_rows()
        for start, stop in zip(blocks["start"], blocks["stop"]):
            extend_rows(rows, self.recognise(int(start), int(stop)))
        return rows

    def close(self) -> None:
        """Release the recogniser and the lmdb."""
        self.recognizer.close()
        self.env.close()


def _with_batches(run: EvalRun) -> Iterable[tuple[Prediction, int, float]]:
    """Each scored prediction with its batch number and that batch's engine seconds."""
    for prediction in run.predictions:
        batch = run.batch_of[prediction.index]
        yield prediction, batch, run.batch_latencies[batch]


@dataclass
class MergedRun:
    """The merged results of every block, ready for ``eval.postprocess.make_report``.

    Attributes:
        run: predictions in index order, inference failures, timings.
        failed_decoding: samples that failed before inference (``stage`` preprocess).
        workers: per worker, ``{"worker", "samples", "blocks"}`` (who did what).
    """

    run: EvalRun
    failed_decoding: list[dict]
    workers: list[dict]


def merge_rows(rows: Mapping[str, Sequence], blocks: Sequence[tuple[int, int]],
               lost: Mapping[tuple[int, int], str], seconds: float) -> MergedRun:
    """Merge the result rows of all blocks into one run.

    Args:
        rows: :data:`RESULT_COLUMNS` as columns, the concatenation of every block's rows.
        blocks: every planned block.
        lost: blocks that returned no rows, with the reason (their samples fail with it).
        seconds: wall time from the first block handed out to the last result.

    Raises:
        ToolchainError: a block returned rows and is also lost, or rows are missing or
            doubled for some index (a bug in a worker, never silently accepted).
    """
    predictions: list[Prediction] = []
    failed_infer: list[dict] = []
    failed_decoding: list[dict] = []
    latencies: dict[tuple[str, int], float] = {}
    per_worker: dict[str, dict] = {}
    seen: set[int] = set()
    count = len(rows["index"]) if rows else 0
    for position in range(count):
        row = {name: rows[name][position] for name in RESULT_COLUMNS}
        index = int(row["index"])
        if index in seen:
            raise ToolchainError(f"sample {index} came back twice from the workers")
        seen.add(index)
        worker = per_worker.setdefault(row["worker"], {"worker": row["worker"], "samples": 0,
                                                       "blocks": set()})
        worker["samples"] += 1
        worker["blocks"].add(int(row["block"]))
        if row["stage"] == "":
            predictions.append(Prediction(index, row["label"], row["prediction"],
                                          float(row["confidence"]), int(row["width"]),
                                          int(row["turn"])))
            latencies[(row["worker"], int(row["batch"]))] = float(row["batch_engine_seconds"])
        elif row["stage"] == "preprocess":
            failed_decoding.append({"index": index, "reason": row["reason"]})
        else:
            failed_infer.append({"index": index, "reason": row["reason"], "stage": row["stage"]})
    for (start, stop), reason in lost.items():
        for index in range(start, stop):
            if index in seen:
                raise ToolchainError(f"block {start}..{stop - 1} is lost but sample {index} "
                                     "came back")
            failed_infer.append({"index": index, "reason": reason, "stage": "worker"})
            seen.add(index)
    expected = {i for start, stop in blocks for i in range(start, stop)}
    if seen != expected:
        missing = sorted(expected - seen)[:3]
        raise ToolchainError(f"the workers returned {len(seen)} of {len(expected)} samples "
                             f"(e.g. no result for {missing})")
    predictions.sort(key=lambda p: p.index)
    failed_infer.sort(key=lambda f: f["index"])
    engine = float(sum(latencies.values()))
    run = EvalRun(predictions, failed_infer, seconds,
                  {"read": 0.0, "engine": engine, "decode": 0.0}, list(latencies.values()))
    workers = [{**w, "blocks": len(w["blocks"])} for w in sorted(per_worker.values(),
                                                                  key=lambda w: w["worker"])]
    return MergedRun(run, failed_decoding, workers)


def empty_rows() -> dict[str, list]:
    """Result columns with no rows."""
    return {name: [] for name in RESULT_COLUMNS}


def extend_rows(rows: dict[str, list], more: Mapping[str, Sequence]) -> None:
    """Append the rows of ``more`` to ``rows`` (both :data:`RESULT_COLUMNS` columns)."""
    for name in RESULT_COLUMNS:
        rows[name].extend(more[name].tolist() if isinstance(more[name], np.ndarray)
                          else more[name])
