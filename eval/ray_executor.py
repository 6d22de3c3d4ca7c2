"""Recognise an lmdb test set on a Ray cluster with Ray Data (an optional dependency).

The lmdb's index ranges (``eval.blocks.plan_blocks``) become Ray Data blocks, one range per
block (``ray.data.from_items``); ``map_batches`` runs them through an actor pool of
:class:`eval.blocks.BlockWorker` (each actor opens the lmdb and loads the model once) and the
per-sample rows come back to the driver, which merges them (``eval.blocks.merge_rows``) and
scores them exactly as one process does. We write no cluster code: scheduling, placement and
actor restarts are Ray's.

Resources per actor: 1 CPU for ONNX Runtime and PyTorch on the CPU, ``num_gpus=1`` with
``--device cuda`` (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``cuda:N`` is refused),
``resources={"NPU": 1}`` for an .om (Ray sets ``ASCEND_RT_VISIBLE_DEVICES``, so each actor
uses its one visible NPU as ``npu:0``).
Without ``address`` a local Ray starts with ``workers`` CPUs; with ``address`` (``auto`` on a
node of the cluster, or the head's ``HOST:6379``) the driver joins that cluster. Ray Client
addresses (``ray://``) are refused: Ray Data does not run through Ray Client in Ray 2.60
(measured: it fails inside its executor). Our packages travel to
the workers as Ray ``py_modules``; every node needs the Python environment (requirements.txt
and requirements-ray.txt) and the data and model at the same paths.

Failures: each actor holds one block at a time, so an actor that dies while recognising a
block loses only that block; the block is not retried: Ray Data skips it
(``DataContext.max_errored_blocks``), and its samples are recorded as failed with the reason.
Ray restarts a dead actor as often as it dies (``max_restarts=-1``, Ray Data's own default):
with a bounded count, a pool whose every actor had died past it left Ray Data's executor
spinning with blocks to hand out and no actor to take them. Each death costs one block, so
even a worker that dies on every block ends the run after as many deaths as there are
blocks, all of them recorded as lost. An actor that cannot start (the data or the model
unreadable on its node) stops the run with one line naming the node.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from common.errors import ToolchainError
from common.ray_cluster import import_ray, join_ray
from eval.blocks import BlockJob, BlockWorker, MergedRun, empty_rows, extend_rows, merge_rows
from infer.device import parse_device
from models.backends import BACKENDS

log = logging.getLogger(__name__)



@dataclass
class RayRun:
    """A merged run and how Ray ran it.

    Attributes:
        merged: see :class:`eval.blocks.MergedRun`; ``merged.run.e2e_seconds`` runs from
            handing out the first block to the last result (actor start-up and model loading
            included).
        start_seconds: time to start or join Ray (``ray.init``), not in ``e2e_seconds``.
        address: the cluster joined, or ``"local"``.
    """

    merged: MergedRun
    start_seconds: float
    address: str


def _actor_resources(device: str | None, backend: str) -> tuple[str, dict]:
    """The resource an actor needs (for the capacity check) and its map_batches arguments:
    the backend row's (``models.backends``) for the device kind, default its first."""
    row = BACKENDS[backend]
    kind = parse_device(device).kind if device is not None else row.devices[0]
    return row.ray_resources(kind)


def run_on_ray(job: BlockJob, blocks: Sequence[tuple[int, int]], workers: int, *,
               address: str | None, backend: str, device: str | None,
               progress: bool = True) -> RayRun:
    """Recognise ``blocks`` of ``job`` with a pool of ``workers`` Ray actors.

    Args:
        job: the model, the data and the settings each actor uses.
        blocks: index ranges ``[start, stop)``; each is one Ray Data block.
        workers: actors in the pool (>= 1).
        address: Ray cluster to join; None starts a local Ray with ``workers`` CPUs (or
            uses the one this process already started).
        backend: ``onnxruntime``, ``torch`` or ``ais_bench`` (chooses the resource).
        device: the device each actor uses (``npu:0`` is forced for an .om, see above).
        progress: a tqdm bar over samples.

    Raises:
        ToolchainError: Ray is not installed, the cluster lacks the resources for
            ``workers`` actors, or an actor cannot start (its one-line reason).
    """
    ray = import_ray("--executor ray", ("ray.data",))
    if workers < 1:
        raise ToolchainError(f"--workers must be >= 1, got {workers}")
    start = time.perf_counter()
    if address and address.startswith("ray://"):
        raise ToolchainError(f"--address {address}: Ray Data does not run through Ray Client "
                             "(ray://) in Ray 2.60; run this command on a node of the cluster "
                             "with --address auto (or the head's HOST:6379)")
    started_here = join_ray(ray, address, workers)
    start_seconds = time.perf_counter() - start
    try:
        resource, arguments = _actor_resources(device, backend)
        available = ray.cluster_resources().get(resource, 0)
        if available < workers:
            raise ToolchainError(
                f"--workers {workers} needs {workers} {resource} in the Ray cluster, which has "
                f"{available:g}" + ("; start the NPU nodes with `ray start --resources "
                                    "'{\"NPU\": N}'` if Ray does not detect them"
                                    if resource == "NPU" else ""))
        actor_device = "npu:0" if resource == "NPU" else device
        merged, seconds = _execute(ray, job, blocks, workers, actor_device, arguments, progress)
    finally:
        if started_here:
            ray.shutdown()
    return RayRun(merged, start_seconds, address or "local")


def _execute(ray, job: BlockJob, blocks: Sequence[tuple[int, int]], workers: int,
             device: str | None, arguments: dict, progress: bool) -> tuple[MergedRun, float]:
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = len(blocks)  # a failed block is recorded, not fatal
    # Our own tqdm bar counts samples; Ray Data's progress lines and INFO plan lines would
    # interleave with it (its warnings and errors still show).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context.enable_progress_bars = False
    dataset = ray.data.from_items([{"start": s, "stop": e} for s, e in blocks],
                                  override_num_blocks=len(blocks))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries are Ray remote arguments, which map_batches still
        # takes as keywords in the pinned Ray (2.60) and warns about.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        results = dataset.map_batches(
            BlockWorker, fn_constructor_args=(job, device), batch_size=None,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(
                size=workers, max_tasks_in_flight_per_actor=1),
            max_restarts=-1, max_task_retries=0, **arguments)
    rows = empty_rows()
    total = sum(stop - begin for begin, stop in blocks)
    bar = tqdm(total=total, unit="img", desc="ray", disable=None if progress else True)
    start = time.perf_counter()
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            extend_rows(rows, batch)
            bar.update(len(batch["index"]))
    except ray.exceptions.RayError as exc:
        raise ToolchainError(_first_cause(exc)) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    returned = {int(b) for b in rows["block"]}
    lost = {(s, e): (f"the Ray worker recognising block {s}..{e - 1} failed (it died or "
                     "raised; Ray's log above says why); the block was not retried")
            for s, e in blocks if s not in returned}
    if lost:
        log.warning("%d of %d Ray Data blocks failed; their %d samples are recorded as failed",
                    len(lost), len(blocks), sum(e - s for s, e in lost))
    return merge_rows(rows, blocks, lost, seconds), seconds


def _first_cause(exc: BaseException) -> str:
    """The innermost one-line reason of a Ray error (our ToolchainError's text if present)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ToolchainError):
            return str(cause).splitlines()[0]
        cause = cause.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    toolchain = [line for line in lines if "ToolchainError" in line]
    return (toolchain[-1].split("ToolchainError: ", 1)[-1] if toolchain
            else f"Ray failed: {lines[-1] if lines else type(exc).__name__}")
