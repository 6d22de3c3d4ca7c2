"""One process per NPU on one host: ``--om-path X.om --device 0,1,2,3``.

What ais_bench's own ``--device 0,1,2,3`` does (one inference process per device), for an
lmdb test set: each device gets a process (``spawn``) holding an
:class:`eval.blocks.BlockWorker` on ``npu:N``; blocks of indices are handed to whichever
device is free, one at a time, and the per-sample rows are merged into one report
(``eval.blocks.merge_rows``). A process that dies fails only the block it held: its samples
are recorded with the reason and a new process starts on that device (at most
:data:`MAX_RESTARTS` times per device; after that the device's remaining blocks go to the
others). A process that cannot start (the model or data unreadable, no ais_bench) stops the
run with its one-line reason.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from common.errors import ToolchainError
from eval.blocks import BlockJob, BlockWorker, MergedRun, empty_rows, extend_rows, merge_rows
from infer.open import parse_device

#: New processes a device gets after its process died.
MAX_RESTARTS = 3

_state: dict[str, object] = {}  # the device process's BlockWorker, or its start-up error


def parse_device_list(text: str) -> list[int]:
    """NPU indices of ``"0,1,2,3"`` (or ``"npu:0,npu:1"``), in the order given.

    Raises:
        ToolchainError: a member that is not an NPU, or a device named twice.
    """
    devices = []
    for member in text.split(","):
        device = parse_device(member)
        if device.kind != "npu":
            raise ToolchainError(f"--device {text}: a device list names NPUs (0,1,... or "
                                 f"npu:0,npu:1,...), not {device}")
        devices.append(device.ordinal)
    if len(set(devices)) != len(devices):
        raise ToolchainError(f"--device {text}: a device is named twice")
    return devices


def _start(job: BlockJob, device: str) -> None:
    try:
        _state["worker"] = BlockWorker(job, device)
    except ToolchainError as exc:  # reported by _ping, as one line in the parent
        _state["error"] = str(exc)


def _recognise(start: int, stop: int) -> dict[str, list]:
    return _state["worker"].recognise(start, stop)


def _ping() -> str | None:
    """The worker's start-up error, or None when it is ready."""
    return _state.get("error")


def run_on_devices(job: BlockJob, blocks: Sequence[tuple[int, int]], devices: Sequence[int],
                   progress: bool = True) -> MergedRun:
    """Recognise ``blocks`` of ``job`` with one process per NPU in ``devices``.

    Raises:
        ToolchainError: a device's process cannot start (the worker's one-line reason).
    """
    context = multiprocessing.get_context("spawn")
    pools: dict[int, ProcessPoolExecutor] = {}
    restarts = dict.fromkeys(devices, 0)

    def open_pool(device: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start,
                                   initargs=(job, f"npu:{device}"))
        try:
            error = pool.submit(_ping).result()
        except BrokenProcessPool:
            error = f"the process for npu:{device} died while starting"
        if error:
            pool.shutdown(wait=True)
            raise ToolchainError(error)
        return pool

    queue = deque(blocks)
    rows = empty_rows()
    lost: dict[tuple[int, int], str] = {}
    running: dict[Future, tuple[int, tuple[int, int]]] = {}
    bar = tqdm(total=sum(e - s for s, e in blocks), unit="img", desc="npu",
               disable=None if progress else True)
    start = time.perf_counter()
    try:
        for device in devices:
            pools[device] = open_pool(device)

        def hand_out(device: int) -> None:
            if queue and device in pools:
                block = queue.popleft()
                running[pools[device].submit(_recognise, *block)] = (device, block)

        for device in devices:
            hand_out(device)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                device, block = running.pop(future)
                try:
                    extend_rows(rows, future.result())
                except BrokenProcessPool:
                    lost[block] = (f"the process for npu:{device} died while recognising block "
                                   f"{block[0]}..{block[1] - 1}; the block was not retried")
                    pools.pop(device).shutdown(wait=True)
                    if restarts[device] < MAX_RESTARTS:
                        restarts[device] += 1
                        pools[device] = open_pool(device)
                    if not pools:
                        lost.update({b: f"no NPU process left (every device died "
                                        f"{MAX_RESTARTS + 1} times)" for b in queue})
                        queue.clear()
                bar.update(block[1] - block[0])
                hand_out(device)
    finally:
        bar.close()
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
    return merge_rows(rows, blocks, lost, time.perf_counter() - start)
