"""Load the HTTP service from this machine and compare it with the offline paths.

One run, on the same model (int8 nano-ocr, built as ``bench.e2e`` builds it unless --model
is given) and the same IIIT5K images (encoded bytes from the lmdb); ``--parts`` picks what
runs (default all):

1. offline: ``pipeline.Recognizer`` on all images in memory, batch 16, in this process
   (decode, resize, equal-width batches, engine, CTC), with the offline default's engine
   lanes (one one-thread lane per core on ONNX Runtime): the ceiling for the service. It
   runs next to the loads it is compared with (before and after the batched levels, before
   the replicas part), as a host's speed can drift by 10 % over minutes;
2. ``levels``: the service, ``python -m serve`` in a child process with its defaults (batches
   of up to 16 per width, 2 ms wait), at 1, 8, 32 and 128 requests in flight, against the
   mean of the offline runs just before and after; and the same service with
   ``--max-batch-size 1`` (no batching), at the same loads;
3. ``overload``: the batched service with its default queue and a 2 s deadline
   (``--timeout-ms 2000``) offered 4x and 16x its capacity (its rate at 32 in flight, from
   the levels, or measured first without them), open loop (a request every 1/rate seconds
   whatever the answers, so a refused client comes back at once, ignoring Retry-After), for
   --overload-seconds each: goodput is the 200s answered within the deadline per second,
   against the capacity;
4. ``fairness``: small requests (8 in flight on ``/service``) alone, then beside one client
   that keeps sending KServe v2 requests of --big-images images each (the IIIT5K words scaled
   up 2x, so each takes a few ms to decode): the small requests' p50 and p99;
5. ``ocr``: the OCR endpoint (``python -m serve --det``, PP-OCRv6 with the pipeline's
   defaults) on --ocr-images photos at the same levels, beside the offline pipeline;
6. ``replicas``: one process against ``--replicas 2`` on Ray Serve (one core each) at 32 in
   flight, behind each of Ray Serve's ingresses (HAProxy, the default, and its Python
   proxy), with the CPU seconds per 1000 requests of each part (server, HAProxy, HTTP
   proxy, replicas, controller, the rest of Ray, the client);
7. ``soak``: 64 in flight for --soak-seconds (10 minutes), every answer compared with the
   answer the idle server gave the same image, the server's RSS sampled every 10 s.

The load tool is a small asyncio client on uvloop (:class:`_Lean`: prebuilt HTTP/1.1
requests on asyncio streams, one keep-alive connection per request in flight, each posting
the next image as soon as its answer arrives; ``POST /service`` with the raw image as the
body; the open-loop overload posts on a timer instead). It runs on the same 2 cores as the
server, so the service's figures include the client's cost, which it keeps small (about a
third of aiohttp's). Every load level is bounded in requests (--requests) and time
(--seconds), the overload runs in time (--overload-seconds) and unanswered requests (1024).
Server memory is ``VmRSS`` of the server process before and after the load.

With ``--predictions P.csv`` the texts the batched service answered at 32 in flight are
written as an ``eval.postprocess``-style predictions file (index, prediction, confidence), for
``python -m eval.compare`` against the offline batch-1 path (see docs/results/README.md).

Example (docs/results/README.md's table):
    python -m bench.serve
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from common.cli import counts, make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file, write_texts
from common.ray_cluster import import_ray
from infer import open_model
from models.backends import backend_of
from pipeline import Recognition, Recognizer
from pipeline.recognizer import engine_lanes
from preprocess.image_folder import default_detector_calibration, list_images
from preprocess.lmdb_reader import (
    count_samples,
    default_calibration_set,
    default_test_set,
    open_lmdb,
    read_sample,
)
from serve.process import ServerProcess, rss_kib

LEVELS = (1, 8, 32, 128)
#: What a run measures (--parts): every part by default.
PARTS = ("levels", "overload", "fairness", "ocr", "replicas", "soak")


def read_images(data: Path, limit: int | None = None) -> list[bytes]:
    """The encoded images of an lmdb, in index order."""
    env = open_lmdb(data)
    count = min(count_samples(env, data), limit or 1 << 30)
    with env.begin() as txn:
        images = [read_sample(txn, index).image for index in range(1, count + 1)]
    env.close()
    return images


def offline(model: Path, images: list[bytes]) -> dict:
    """Images/s of the in-memory recogniser with the offline default's engine lanes
    (``pipeline.recognizer.engine_lanes``; after one warm-up call)."""
    lanes, threads = engine_lanes(backend_of(model).name, None)
    runner, spec = open_model(model, threads=threads)
    with Recognizer(runner, spec, batch_size=16, lanes=lanes) as recognizer:
        recognizer(images[:32])
        start = time.perf_counter()
        results = recognizer(images)
        seconds = time.perf_counter() - start
    failed = sum(not isinstance(r, Recognition) for r in results)
    return {"images_per_s": len(images) / seconds, "seconds": seconds, "failed": failed}


def same_answer(expected: dict | None, answer: dict) -> bool:
    """Whether a ``/service`` answer is ``expected``: the same text, the confidence within
    1e-4 (ONNX Runtime's kernels may round differently at another batch size)."""
    return (expected is not None and expected["text"] == answer["text"]
            and abs(expected["confidence"] - answer["confidence"]) <= 1e-4)


async def _load(url: str, images: list[bytes], in_flight: int, requests: int,
                seconds: float, path: str = "/service", reference: dict | None = None,
                rss_pid: int | None = None, rss_every_s: float = 10.0) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    answers: dict[int, dict] = {}
    mismatches = 0
    rss: list[tuple[float, float]] = []
    next_index = 0
    stop_at = time.monotonic() + seconds
    client = _Lean(url, images, path)

    async def sample_rss(start: float) -> None:
        while True:
            rss.append((time.monotonic() - start, rss_kib(rss_pid) / 1024))
            await asyncio.sleep(rss_every_s)

    async def worker() -> None:
        nonlocal next_index, mismatches
        while next_index < requests and time.monotonic() < stop_at:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                status, body = await client.post(index)
            except _Lean.ERRORS as exc:
                statuses[type(exc).__name__] += 1
                continue
            latency = time.perf_counter() - start
            statuses[status] += 1
            if status == 200:
                payload = json.loads(body)
                latencies.append(latency)
                answers[index % len(images)] = payload
                if reference is not None and not same_answer(
                        reference.get(index % len(images)), payload):
                    mismatches += 1

    start = time.perf_counter()
    sampler = (asyncio.create_task(sample_rss(time.monotonic()))
               if rss_pid is not None else None)
    try:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    finally:
        client.close()
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler.cancel()
        rss.append((time.monotonic() - stop_at + seconds, rss_kib(rss_pid) / 1024))
    latencies.sort()
    ok = len(latencies)
    return {
        "in_flight": in_flight,
        "sent": sum(statuses.values()),
        "ok": ok,
        "images_per_s": ok / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if ok else None,
        "p99_ms": 1000 * latencies[min(ok - 1, int(0.99 * ok))] if ok else None,
        "max_ms": 1000 * latencies[-1] if ok else None,
        "statuses": dict(statuses),
        "answers": answers,
        "mismatches": mismatches,
        "rss_mib": rss,
    }


def run_client(coroutine):
    """Run a load client's coroutine to its end on uvloop (uvicorn's loop, which the server
    runs too): on these 2 shared cores the client's own cost is taken from the server, and
    uvloop's is about three quarters of asyncio's default loop's at 16x overload."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


class _Lean:
    """The load client's HTTP/1.1: prebuilt ``POST`` requests (the raw image as the body)
    written on asyncio streams over kept connections, the answer's status line and
    ``Content-Length`` body read back. It shares the 2 cores with the server it measures, so
    it does as little as it can: aiohttp took about 0.3 ms of client CPU per request at 32 in
    flight and most of a core at 16x overload; this takes a fraction of that."""

    #: What :meth:`post` raises for a failed request (counted by the callers by type name).
    ERRORS = (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError)

    def __init__(self, url: str, images: list[bytes], path: str = "/service",
                 timeout_s: float = 60.0) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout_s = host, int(port), timeout_s
        self.requests = [b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (path.encode(), host.encode(), len(image), image)
                         for image in images]
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, index: int) -> tuple[int, bytes]:
        """Send request ``index`` (modulo the images) and return the answer's status and
        body; a kept connection the server closed while it was idle (its keep-alive timeout)
        is replaced by a new one, as HTTP clients do.

        Raises:
            OSError: the connection failed. asyncio.IncompleteReadError: the server closed it
                mid-answer. TimeoutError: no whole answer within ``timeout_s``. ValueError: an
                answer without Content-Length (chunked).
        """
        async with asyncio.timeout(self.timeout_s):
            return await self._post(index)

    async def _post(self, index: int) -> tuple[int, bytes]:
        while self.idle:
            try:
                return await self._exchange(*self.idle.pop(), index)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:  # the server answered part: a real failure
                    raise
        return await self._exchange(*await asyncio.open_connection(self.host, self.port), index)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        index: int) -> tuple[int, bytes]:
        try:
            writer.write(self.requests[index % len(self.requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
            if b"content-length" not in fields:
                raise ValueError(f"an answer ({status}) without Content-Length: {head[:200]!r}")
            body = await reader.readexactly(int(fields[b"content-length"]))
        except BaseException:
            writer.close()
            raise
        if fields.get(b"connection") == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


#: The open-loop client's timer: it sleeps at least this long and then sends every request
#: due by then (each late by under a tick), rather than waking once per request.
OPEN_LOOP_TICK_S = 0.005


async def _open_loop(url: str, images: list[bytes], rate: float, seconds: float,
                     outstanding_cap: int, deadline_s: float) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    outstanding = 0
    client = _Lean(url, images)

    async def send(index: int) -> None:
        nonlocal outstanding
        start = time.perf_counter()
        try:
            status, _ = await client.post(index)
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - start)
        except _Lean.ERRORS as exc:
            statuses[type(exc).__name__] += 1
        finally:
            outstanding -= 1

    tasks = []
    sent = 0
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:  # due later: wake once a tick and send what is due by then
            await asyncio.sleep(max(delay, OPEN_LOOP_TICK_S))
        if outstanding >= outstanding_cap:
            statuses["not sent (client at its cap)"] += 1
            continue
        outstanding += 1
        sent += 1
        tasks.append(asyncio.create_task(send(index)))
    send_seconds = time.perf_counter() - start
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    client.close()
    latencies.sort()
    good = sum(1 for latency in latencies if latency <= deadline_s)
    return {"offered_per_s": rate, "sent_per_s": sent / send_seconds, "statuses": dict(statuses),
            "ok_per_s": len(latencies) / wall, "goodput_per_s": good / wall,
            "max_ms": 1000 * latencies[-1] if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}


def overload(url: str, images: list[bytes], rate: float, seconds: float,
             deadline_s: float, outstanding_cap: int = 1024) -> dict:
    """Open-loop load: a request every ``1 / rate`` seconds for ``seconds``, whatever the
    answers (at most ``outstanding_cap`` unanswered; beyond, sends are skipped and counted).

    Returns:
        the rate offered and the rate the client managed to send, statuses by code, 200s per
        second, goodput (200s within ``deadline_s`` per second), the slowest and p99 200 in
        ms (client-measured: from sending, so including time in the client and the kernel's
        accept queue).
    """
    return run_client(_open_loop(url, images, rate, seconds, outstanding_cap, deadline_s))


def big_request(images: list[bytes]) -> bytes:
    """A KServe v2 JSON request carrying ``images`` (base64) as the ``images`` tensor."""
    return json.dumps({"inputs": [{
        "name": "images", "shape": [len(images)], "datatype": "BYTES",
        "data": [base64.b64encode(image).decode("ascii") for image in images]}]}).encode()


def scaled_images(images: list[bytes], count: int, factor: int = 2) -> list[bytes]:
    """``count`` of ``images`` scaled up ``factor`` times and re-encoded as PNG."""
    from PIL import Image

    scaled = []
    for raw in images[:count]:
        with Image.open(io.BytesIO(raw)) as image:
            image = image.convert("RGB")
            big = image.resize((image.width * factor, image.height * factor))
        buffer = io.BytesIO()
        big.save(buffer, format="PNG")
        scaled.append(buffer.getvalue())
    return scaled


async def _fairness(url: str, name: str, images: list[bytes], big: bytes | None,
                    requests: int, seconds: float) -> dict:
    import aiohttp

    stop = False
    big_answers: Counter = Counter()

    async def big_client() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            while not stop:
                async with session.post(f"{url}/v2/models/{name}/infer", data=big) as answer:
                    await answer.read()
                    big_answers[answer.status] += 1

    task = asyncio.create_task(big_client()) if big is not None else None
    try:
        if task is not None:
            await asyncio.sleep(0.5)  # the first big request is being decoded
        small = await _load(url, images, 8, requests, seconds)
    finally:
        stop = True
        if task is not None:
            await task
    return {**small, "big_statuses": dict(big_answers)}


def fairness(url: str, name: str, images: list[bytes], big: bytes | None, requests: int,
             seconds: float) -> dict:
    """Small requests at 8 in flight (as :func:`load`), beside a client that keeps posting
    ``big`` to the v2 endpoint of model ``name`` (None: alone)."""
    return run_client(_fairness(url, name, images, big, requests, seconds))


def load(url: str, images: list[bytes], in_flight: int, requests: int, seconds: float,
         path: str = "/service", reference: dict | None = None,
         rss_pid: int | None = None) -> dict:
    """Post images to ``url + path`` with ``in_flight`` requests outstanding, until
    ``requests`` are answered or ``seconds`` pass.

    Args:
        reference: image position -> the answer expected (JSON); answers that differ are
            counted as ``mismatches``.
        rss_pid: a process whose resident memory is sampled every 10 s during the load.

    Returns:
        sent/ok counts, images/s (answered 200 per wall second), p50/p99/max latency in ms,
        statuses by code (or client error name), the last JSON answer by image position,
        mismatches against ``reference``, and ``rss_mib``: ``(seconds, MiB)`` samples.
    """
    return run_client(_load(url, images, in_flight, requests, seconds, path, reference,
                             rss_pid))


def serve_levels(model: Path, images: list[bytes], levels: Sequence[int], extra: Sequence[str],
                 requests: int, seconds: float, path: str = "/service") -> dict:
    """Start a server with ``extra`` options and load it at each level; RSS before/after."""
    with ServerProcess(["--model", str(model), *extra]) as server:
        before = rss_kib(server.process.pid)
        rows = [load(server.url, images, n, requests, seconds, path) for n in levels]
        after = rss_kib(server.process.pid)
    return {"rows": rows, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024}


def ocr_levels(photos: list[bytes], levels: Sequence[int], requests: int,
               seconds: float) -> dict:
    """The OCR endpoint (``python -m serve --det``: PP-OCRv6 det, cls, rec with the pipeline's
    defaults) at each level, and the offline pipeline (the same defaults) on the same photos
    in this process: decode, detect, classify, recognise."""
    from pipeline.ocr import open_pipeline
    from preprocess.image import decode_rgb

    with open_pipeline() as pipeline:
        pipeline([decode_rgb(raw) for raw in photos[:2]])  # warm-up
        start = time.perf_counter()
        for raw in photos:
            pipeline([decode_rgb(raw)])
        offline_rate = len(photos) / (time.perf_counter() - start)
    with ServerProcess(["--det", "--grpc-port", "0"]) as server:
        before = rss_kib(server.process.pid)
        rows = [load(server.url, photos, n, requests, seconds, "/ocr") for n in levels]
        after = rss_kib(server.process.pid)
    return {"rows": rows, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
            "offline_images_per_s": offline_rate}


#: Process titles of Ray Serve's parts (``ray::NAME``), for the CPU accounting.
RAY_ROLES = {"ProxyActor": "HTTP proxy", "ServeReplica": "replicas",
             "ServeController": "controller", "haproxy": "HAProxy"}


def _ray_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of Ray Serve's processes by role; the rest of Ray's
    own processes (raylet, GCS, workers idle) as ``other Ray``."""
    import psutil

    seconds: Counter = Counter()
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        line = " ".join(process.info["cmdline"] or ())
        if not line.startswith("ray::") and "/ray/" not in line and "haproxy" not in line:
            continue
        role = next((r for key, r in RAY_ROLES.items() if key in line), "other Ray")
        times = process.info["cpu_times"]
        if times is not None:
            seconds[role] += times.user + times.system
    return dict(seconds)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def replicas_vs_one(model: Path, images: list[bytes], in_flight: int, requests: int,
                    seconds: float, ingresses: Sequence[str] = ("haproxy",)) -> dict:
    """One process (its defaults: one engine lane per core) against ``--replicas 2`` on Ray
    Serve (one core each) behind each of ``ingresses`` (``--ray-ingress``), at
    ``in_flight``; CPU seconds per role during each load."""
    import psutil

    results = {}
    with ServerProcess(["--model", str(model), "--grpc-port", "0"]) as server:
        load(server.url, images[:200], in_flight, 200, seconds)  # warm-up
        server_cpu = psutil.Process(server.process.pid).cpu_times()
        client = _own_cpu()
        one = load(server.url, images, in_flight, requests, seconds)
        after = psutil.Process(server.process.pid).cpu_times()
        one["cpu_s"] = {"server": after.user + after.system - server_cpu.user
                        - server_cpu.system, "client": _own_cpu() - client}
        results["one process"] = one
    for ingress in ingresses:
        with ServerProcess(["--model", str(model), "--replicas", "2", "--ray-ingress", ingress],
                           ready_timeout=300) as server:
            load(server.url, images[:200], in_flight, 200, seconds)  # warm-up
            before, client = _ray_cpu(), _own_cpu()
            two = load(server.url, images, in_flight, requests, seconds)
            after = _ray_cpu()
            two["cpu_s"] = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
            two["cpu_s"]["client"] = _own_cpu() - client
        results[f"2 Ray Serve replicas, {ingress} ingress"] = two
    return results


def soak(model: Path, images: list[bytes], in_flight: int, seconds: float) -> dict:
    """``seconds`` of ``in_flight`` requests on one server, every answer compared with the
    answer the idle server gave the same image (one request at a time, before the soak), the
    server's RSS sampled every 10 s."""
    with ServerProcess(["--model", str(model), "--grpc-port", "0"]) as server:
        idle = load(server.url, images, 1, len(images), 600.0)
        result = load(server.url, images, in_flight, int(seconds) * 10_000, seconds,
                      reference=idle["answers"], rss_pid=server.process.pid)
    result["idle_answers"] = len(idle["answers"])
    return result


def _offline_now(model: Path, images: list[bytes], when: str) -> dict:
    """Measure the offline path now (:func:`offline`) and print its rate; the parts compare
    with a run made next to their own loads, as this host's speed drifts over minutes."""
    result = offline(model, images)
    print(f"offline in-memory recogniser{when}: {result['images_per_s']:.0f} img/s "
          f"({result['seconds']:.2f} s, {result['failed']} failed)", flush=True)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_rows(title: str, result: dict, baseline: dict | None, offline_rate: float) -> None:
    print(f"\n{title} (server RSS {result['rss_before_mib']:.0f} MiB before the load, "
          f"{result['rss_after_mib']:.0f} MiB after)")
    print(f"{'in flight':>9} {'img/s':>7} {'x unbatched':>11} {'x offline':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for index, row in enumerate(result["rows"]):
        errors = row["sent"] - row["ok"]
        ratio = (row["images_per_s"] / baseline["rows"][index]["images_per_s"]
                 if baseline else None)
        print(f"{row['in_flight']:>9} {row['images_per_s']:>7.0f} {_fmt(ratio, '.2f'):>11} "
              f"{row['images_per_s'] / offline_rate:>9.2f} {_fmt(row['p50_ms'], '.1f'):>7} "
              f"{_fmt(row['p99_ms'], '.1f'):>7} {errors:>6}")


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path,
                        help="model to serve (default: int8 nano-ocr, built as bench.e2e does)")
    parser.add_argument("--data", type=Path, default=default_test_set(),
                        help="lmdb of images ($IIIT5K_LMDB)")
    parser.add_argument("--calibration", type=Path, default=default_calibration_set(),
                        help="lmdb for int8 calibration when building the model")
    parser.add_argument("--requests", type=positive(int), default=3000,
                        help="requests per load level (images are reused past the set's end)")
    parser.add_argument("--seconds", type=positive(float), default=60.0,
                        help="time cap per load level")
    parser.add_argument("--levels", type=counts, default=",".join(map(str, LEVELS)),
                        help="requests in flight, comma-separated")
    parser.add_argument("--overload-seconds", type=positive(float), default=10.0,
                        help="length of each open-loop overload run")
    parser.add_argument("--big-images", type=positive(int), default=64,
                        help="images per request of the fairness run's big client (default: "
                             "the service's default --max-request-images)")
    parser.add_argument("--parts", type=_parts, default=",".join(PARTS),
                        help=f"what to measure, comma-separated ({', '.join(PARTS)}; default "
                             f"all)")
    parser.add_argument("--photos", type=Path, default=default_detector_calibration(),
                        help="folder of photos for the OCR endpoint ($DET_CALIB_IMAGES)")
    parser.add_argument("--ocr-images", type=positive(int), default=100,
                        help="photos posted to /ocr (the first N of --photos)")
    parser.add_argument("--replicas-in-flight", type=positive(int), default=32,
                        help="requests in flight for one process against 2 replicas")
    parser.add_argument("--soak-seconds", type=positive(float), default=600.0,
                        help="length of the soak")
    parser.add_argument("--soak-in-flight", type=positive(int), default=64,
                        help="requests in flight during the soak")
    parser.add_argument("--predictions", type=Path,
                        help="write the batched service's answers at 32 in flight here (CSV; "
                             "a new file)")
    return parser


def write_predictions(path: Path, answers: dict[int, dict]) -> None:
    """``index,prediction,confidence`` rows (lmdb indices from 1), written whole."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "prediction", "confidence"])
    for position in sorted(answers):
        answer = answers[position]
        writer.writerow([position + 1, answer["text"], f"{answer['confidence']:.4f}"])
    write_texts({path: buffer.getvalue()})


def _parts(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {','.join(PARTS)}; got {text!r}")
    return parts


def _run(args) -> int:
    from bench.e2e import build_models

    levels, parts = args.levels, args.parts
    if args.model is not None and not args.model.is_file():  # before reading the images
        raise ToolchainError(f"{args.model}: not a model file (--model)")
    if args.predictions is not None:
        if args.predictions.exists():
            raise ToolchainError(f"{args.predictions}: exists; --predictions writes a new file")
        if 32 not in levels or "levels" not in parts:
            raise ToolchainError("--predictions keeps the answers at 32 in flight; "
                                 "--levels must include 32 and --parts levels")
        check_output_file(args.predictions, "--predictions")
    if "replicas" in parts:
        import_ray("bench.serve --parts replicas", ("ray.serve",))
    photos = []
    if "ocr" in parts:
        if not args.photos.is_dir():
            raise ToolchainError(f"{args.photos}: no such folder of photos (--photos, "
                                 f"$DET_CALIB_IMAGES)")
        photos = [p.read_bytes() for p in list_images(args.photos)[:args.ocr_images]]
    images = read_images(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = args.model
        if model is None:
            _, _, _, model, build_seconds = build_models(Path(tmp), args.calibration)
            print(f"built int8 nano-ocr in {build_seconds:.0f} s (not timed below)")
        print(f"{len(images)} images from {args.data}; model {model.name}")
        capacity = None  # the batched service at 32 in flight, once measured
        if "levels" in parts:
            before = _offline_now(model, images, " before the batched service's levels")
            batched = serve_levels(model, images, levels, ["--grpc-port", "0"], args.requests,
                                   args.seconds)
            after = _offline_now(model, images, " after the batched service's levels")
            rate = (before["images_per_s"] + after["images_per_s"]) / 2
            print(f"x offline below: against {rate:.0f} img/s, the mean of the offline runs "
                  f"just before and after the batched levels (this host's speed drifts)")
            unbatched = serve_levels(model, images, levels,
                                     ["--grpc-port", "0", "--max-batch-size", "1"],
                                     args.requests, args.seconds)
            _print_rows("service, batched (--max-batch-size 16 --max-wait-ms 2)", batched,
                        unbatched, rate)
            _print_rows("service, unbatched (--max-batch-size 1)", unbatched, None, rate)
            if 32 in levels:
                capacity = batched["rows"][levels.index(32)]["images_per_s"]
            if args.predictions is not None:
                answered = batched["rows"][levels.index(32)]["answers"]
                write_predictions(args.predictions, answered)
                print(f"wrote {len(answered)} answers (32 in flight) to {args.predictions}")
        if "overload" in parts:
            if capacity is None:
                capacity = load_capacity(model, images, args)
            _overload_part(model, images, args, capacity)
        if "fairness" in parts:
            _fairness_part(model, images, args)
        if "ocr" in parts:
            result = ocr_levels(photos, levels, args.requests, args.seconds)
            _print_rows(f"OCR endpoint (/ocr, PP-OCRv6 pipeline defaults), {len(photos)} "
                        f"photos from {args.photos}", result, None,
                        result["offline_images_per_s"])
            print(f"offline pipeline on the same photos: "
                  f"{result['offline_images_per_s']:.2f} img/s")
        if "replicas" in parts:
            _replicas_part(model, images, args,
                           _offline_now(model, images, " before the replicas part"))
        if "soak" in parts:
            _soak_part(model, images, args)
    return 0


def _overload_part(model: Path, images: list[bytes], args, capacity: float) -> None:
    """Open-loop overload at 4x and 16x ``capacity`` (images/s at 32 in flight)."""
    floods = {}
    with ServerProcess(["--model", str(model), "--timeout-ms", "2000",
                        "--grpc-port", "0"]) as server:
        for times in (4, 16):
            floods[times] = overload(server.url, images, times * capacity,
                                     args.overload_seconds, deadline_s=2.0)
    print(f"\noverload: open loop, default --max-queue, --timeout-ms 2000, "
          f"{args.overload_seconds:g} s each; capacity = the batched service at 32 in flight "
          f"({capacity:.0f} img/s)")
    print("| offered | offered req/s | sent req/s | 200 within 2 s per s | x capacity | "
          "p99 of 200s ms | slowest 200 ms | statuses |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for times, flood in floods.items():
        print(f"| {times}x | {flood['offered_per_s']:.0f} | {flood['sent_per_s']:.0f} | "
              f"{flood['goodput_per_s']:.0f} | {flood['goodput_per_s'] / capacity:.2f} | "
              f"{_fmt(flood['p99_ms'], '.0f')} | {_fmt(flood['max_ms'], '.0f')} | "
              f"{flood['statuses']} |")


def load_capacity(model: Path, images: list[bytes], args) -> float:
    """The batched service's images/s at 32 in flight (its capacity)."""
    with ServerProcess(["--model", str(model), "--grpc-port", "0"]) as server:
        return load(server.url, images, 32, args.requests, args.seconds)["images_per_s"]


def _fairness_part(model: Path, images: list[bytes], args) -> None:
    big = big_request(scaled_images(images, args.big_images))
    small = images[:500]
    with ServerProcess(["--model", str(model), "--name", "m", "--grpc-port", "0",
                        "--max-body-bytes", str(4 * len(big))]) as server:
        alone = fairness(server.url, "m", small, None, 1000, args.seconds)
        beside = fairness(server.url, "m", small, big, 1000, args.seconds)
    print(f"\nfairness: small /service requests at 8 in flight, alone and beside a client "
          f"posting v2 requests of {args.big_images} images ({len(big) / 1e6:.1f} MB each)")
    print("| small requests | img/s | p50 ms | p99 ms | errors | big requests answered |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, row in (("alone", alone), ("beside big requests", beside)):
        print(f"| {label} | {row['images_per_s']:.0f} | {_fmt(row['p50_ms'], '.1f')} | "
              f"{_fmt(row['p99_ms'], '.1f')} | {row['sent'] - row['ok']} | "
              f"{row['big_statuses'] or '-'} |")
    if alone["p99_ms"] and beside["p99_ms"]:
        print(f"p99 beside big requests / alone: {beside['p99_ms'] / alone['p99_ms']:.2f}")


def _replicas_part(model: Path, images: list[bytes], args, base: dict) -> None:
    n = args.replicas_in_flight
    result = replicas_vs_one(model, images, n, args.requests, args.seconds,
                             ("haproxy", "proxy"))
    one = result["one process"]
    print(f"\nreplicas: one process (one engine lane per core) against --replicas 2 on Ray Serve "
          f"(one core each), {n} in flight on /service")
    print("| service | img/s | x one process | x offline | p50 ms | p99 ms | errors | "
          "CPU s per 1000 requests |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, row in result.items():
        per = {role: f"{1000 * cpu / max(row['sent'], 1):.1f}"
               for role, cpu in sorted(row["cpu_s"].items())}
        print(f"| {label} | {row['images_per_s']:.0f} | "
              f"{row['images_per_s'] / one['images_per_s']:.2f} | "
              f"{row['images_per_s'] / base['images_per_s']:.2f} | "
              f"{_fmt(row['p50_ms'], '.1f')} | {_fmt(row['p99_ms'], '.1f')} | "
              f"{row['sent'] - row['ok']} | {per} |")
        if row["sent"] > row["ok"]:
            print(f"  {label}: statuses {row['statuses']}")


def _soak_part(model: Path, images: list[bytes], args) -> None:
    result = soak(model, images, args.soak_in_flight, args.soak_seconds)
    samples = result["rss_mib"]
    after_minute = next((mib for t, mib in samples if t >= 60.0), samples[-1][1])
    growth = samples[-1][1] / after_minute - 1.0
    print(f"\nsoak: {args.soak_in_flight} in flight on /service for {args.soak_seconds:g} s; "
          f"every answer compared with the idle server's ({result['idle_answers']} images)")
    print(f"requests {result['sent']}, 200s {result['ok']}, errors "
          f"{result['sent'] - result['ok']} {result['statuses']}, answers unlike the idle "
          f"one {result['mismatches']}; {result['images_per_s']:.0f} img/s, p50 "
          f"{_fmt(result['p50_ms'], '.1f')} ms, p99 {_fmt(result['p99_ms'], '.1f')} ms")
    print("server RSS (MiB) every 10 s: " + ", ".join(f"{mib:.0f}" for _, mib in samples))
    print(f"RSS growth after the first minute: {100 * growth:+.1f} % "
          f"({after_minute:.0f} -> {samples[-1][1]:.0f} MiB)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
