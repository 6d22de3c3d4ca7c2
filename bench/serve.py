"""Load the HTTP service from this machine and compare it with the offline recogniser.

One run, on the same model (int8 nano-ocr, built as ``bench.e2e`` builds it unless --model
is given) and the same IIIT5K images (encoded bytes from the lmdb):

1. offline: ``pipeline.Recognizer`` on all images in memory, batch 16, in this process
   (decode, resize, equal-width batches, engine, CTC): the ceiling for the service.
2. the service, ``python -m serve`` in a child process with its defaults (batches of up to
   16 per width, 2 ms wait), at 1, 8, 32 and 64 requests in flight;
3. the same service with ``--max-batch-size 1`` (no batching), at the same loads;
4. overload: the batched service with its default queue and a 2 s deadline (``--timeout-ms
   2000``) offered 4x and 16x the rate the batched service reached at 32 in flight (its
   capacity), open loop (a request every 1/rate seconds whatever the answers, so a refused
   client comes back at once, ignoring Retry-After), for --overload-seconds each: goodput is
   the 200s answered within the deadline per second, against the capacity;
5. fairness: small requests (8 in flight on ``/service``) alone, then beside one client that
   keeps sending KServe v2 requests of --big-images images each (the IIIT5K words scaled up
   2x, so each takes a few ms to decode): the small requests' p50 and p99 with and without.

The load tool is a small asyncio client on aiohttp (one keep-alive connection per request in
flight, each posting the next image as soon as its answer arrives; ``POST /service`` with the
raw image as the body). It runs on the same 2 cores as the server, so the service's figures
include the client's cost. The open-loop overload uses a leaner client (:class:`_Lean`:
prebuilt requests on asyncio streams), since at 16x aiohttp's own cost would take the cores
being measured. Every load level is bounded in requests (--requests) and time (--seconds),
the overload runs in time (--overload-seconds) and unanswered requests (1024). Server memory
is ``VmRSS`` of the server process before and after the load.

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
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file, write_texts
from infer import open_model
from pipeline import Recognition, Recognizer
from preprocess.lmdb_reader import (
    count_samples,
    default_calibration_set,
    default_test_set,
    open_lmdb,
    read_sample,
)
from serve.process import ServerProcess, rss_kib

LEVELS = (1, 8, 32, 64)


def read_images(data: Path, limit: int | None = None) -> list[bytes]:
    """The encoded images of an lmdb, in index order."""
    env = open_lmdb(data)
    count = min(count_samples(env, data), limit or 1 << 30)
    with env.begin() as txn:
        images = [read_sample(txn, index).image for index in range(1, count + 1)]
    env.close()
    return images


def offline(model: Path, images: list[bytes]) -> dict:
    """Images/s of the in-memory recogniser (after one warm-up call)."""
    runner, spec = open_model(model)
    with Recognizer(runner, spec, batch_size=16) as recognizer:
        recognizer(images[:32])
        start = time.perf_counter()
        results = recognizer(images)
        seconds = time.perf_counter() - start
    failed = sum(not isinstance(r, Recognition) for r in results)
    return {"images_per_s": len(images) / seconds, "seconds": seconds, "failed": failed}


async def _load(url: str, images: list[bytes], in_flight: int, requests: int,
                seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    answers: dict[int, tuple[str, float]] = {}
    next_index = 0
    stop_at = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < stop_at:
            index = next_index
            next_index += 1
            body = images[index % len(images)]
            start = time.perf_counter()
            try:
                async with session.post(url + "/service", data=body) as response:
                    payload = await response.json()
                    statuses[response.status] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1
                continue
            latency = time.perf_counter() - start
            if response.status == 200:
                latencies.append(latency)
                answers[index % len(images)] = (payload["text"], payload["confidence"])

    connector = aiohttp.TCPConnector(limit=in_flight)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
        wall = time.perf_counter() - start
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
    }


class _Lean:
    """A lean HTTP/1.1 client for the open-loop overload: prebuilt ``POST /service`` requests
    written on asyncio streams over kept connections, the answer's status line and
    ``Content-Length`` body read back. At 16x overload aiohttp took most of one of the two
    cores this bench shares with the server (about 1 ms of client time per request); this
    costs a fraction of that, so the figures measure the server rather than the client."""

    def __init__(self, url: str, images: list[bytes]) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.requests = [b"POST /service HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (host.encode(), len(image), image) for image in images]
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, index: int) -> int:
        """Send request ``index`` (modulo the images) and return the answer's status; a kept
        connection the server closed while it was idle (its keep-alive timeout) is replaced
        by a new one, as HTTP clients do."""
        while self.idle:
            try:
                return await self._exchange(*self.idle.pop(), index)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:  # the server answered part: a real failure
                    raise
        return await self._exchange(*await asyncio.open_connection(self.host, self.port), index)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        index: int) -> int:
        try:
            writer.write(self.requests[index % len(self.requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
            await reader.readexactly(int(fields.get(b"content-length", b"0")))
        except BaseException:
            writer.close()
            raise
        if fields.get(b"connection") == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


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
            status = await asyncio.wait_for(client.post(index), 60)
            statuses[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - start)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            statuses[type(exc).__name__] += 1
        finally:
            outstanding -= 1

    tasks = []
    sent = 0
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
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
    return asyncio.run(_open_loop(url, images, rate, seconds, outstanding_cap, deadline_s))


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
    return asyncio.run(_fairness(url, name, images, big, requests, seconds))


def load(url: str, images: list[bytes], in_flight: int, requests: int, seconds: float) -> dict:
    """Post images to ``url``/service with ``in_flight`` requests outstanding, until
    ``requests`` are answered or ``seconds`` pass.

    Returns:
        sent/ok counts, images/s (answered 200 per wall second), p50/p99/max latency in ms,
        statuses by code (or client error name), and ``(text, confidence)`` by image
        position.
    """
    return asyncio.run(_load(url, images, in_flight, requests, seconds))


def serve_levels(model: Path, images: list[bytes], levels: Sequence[int], extra: Sequence[str],
                 requests: int, seconds: float) -> dict:
    """Start a server with ``extra`` options and load it at each level; RSS before/after."""
    with ServerProcess(["--model", str(model), *extra]) as server:
        before = rss_kib(server.process.pid)
        rows = [load(server.url, images, n, requests, seconds) for n in levels]
        after = rss_kib(server.process.pid)
    return {"rows": rows, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024}


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


def _levels(text: str) -> list[int]:
    try:
        levels = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated counts, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return levels


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
    parser.add_argument("--levels", type=_levels, default=",".join(map(str, LEVELS)),
                        help="requests in flight, comma-separated")
    parser.add_argument("--overload-seconds", type=positive(float), default=10.0,
                        help="length of each open-loop overload run")
    parser.add_argument("--big-images", type=positive(int), default=64,
                        help="images per request of the fairness run's big client (default: "
                             "the service's default --max-request-images)")
    parser.add_argument("--predictions", type=Path,
                        help="write the batched service's answers at 32 in flight here (CSV; "
                             "a new file)")
    return parser


def write_predictions(path: Path, answers: dict[int, tuple[str, float]]) -> None:
    """``index,prediction,confidence`` rows (lmdb indices from 1), written whole."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "prediction", "confidence"])
    for position in sorted(answers):
        text, confidence = answers[position]
        writer.writerow([position + 1, text, f"{confidence:.4f}"])
    write_texts({path: buffer.getvalue()})


def _run(args) -> int:
    from bench.e2e import build_models

    levels = args.levels
    if args.predictions is not None:
        if args.predictions.exists():
            raise ToolchainError(f"{args.predictions}: exists; --predictions writes a new file")
        if 32 not in levels:
            raise ToolchainError("--predictions keeps the answers at 32 in flight; "
                                 "--levels must include 32")
        check_output_file(args.predictions, "--predictions")
    images = read_images(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = args.model
        if model is None:
            _, _, _, model, build_seconds = build_models(Path(tmp), args.calibration)
            print(f"built int8 nano-ocr in {build_seconds:.0f} s (not timed below)")
        print(f"{len(images)} images from {args.data}; model {model.name}")
        base = offline(model, images)
        print(f"offline in-memory recogniser: {base['images_per_s']:.0f} img/s "
              f"({base['seconds']:.2f} s, {base['failed']} failed)")
        batched = serve_levels(model, images, levels, [], args.requests, args.seconds)
        unbatched = serve_levels(model, images, levels, ["--max-batch-size", "1"],
                                 args.requests, args.seconds)
        saturation = batched["rows"][-1]["images_per_s"]
        if 32 in levels:
            saturation = batched["rows"][levels.index(32)]["images_per_s"]
        floods = {}
        with ServerProcess(["--model", str(model), "--timeout-ms", "2000"]) as server:
            for times in (4, 16):
                floods[times] = overload(server.url, images, times * saturation,
                                         args.overload_seconds, deadline_s=2.0)
        big = big_request(scaled_images(images, args.big_images))
        small = images[:500]
        with ServerProcess(["--model", str(model), "--name", "m",
                            "--max-body-bytes", str(4 * len(big))]) as server:
            alone = fairness(server.url, "m", small, None, 1000, args.seconds)
            beside = fairness(server.url, "m", small, big, 1000, args.seconds)
    if args.predictions is not None:
        answered = batched["rows"][levels.index(32)]["answers"]
        write_predictions(args.predictions, answered)
        print(f"wrote {len(answered)} answers (32 in flight) to {args.predictions}")
    _print_rows("service, batched (--max-batch-size 16 --max-wait-ms 2)", batched, unbatched,
                base["images_per_s"])
    _print_rows("service, unbatched (--max-batch-size 1)", unbatched, None, base["images_per_s"])
    print(f"\noverload: open loop, default --max-queue, --timeout-ms 2000, "
          f"{args.overload_seconds:g} s each; capacity = the batched service at 32 in flight "
          f"({saturation:.0f} img/s)")
    print("| offered | offered req/s | sent req/s | 200 within 2 s per s | x capacity | "
          "p99 of 200s ms | slowest 200 ms | statuses |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for times, flood in floods.items():
        print(f"| {times}x | {flood['offered_per_s']:.0f} | {flood['sent_per_s']:.0f} | "
              f"{flood['goodput_per_s']:.0f} | {flood['goodput_per_s'] / saturation:.2f} | "
              f"{_fmt(flood['p99_ms'], '.0f')} | {_fmt(flood['max_ms'], '.0f')} | "
              f"{flood['statuses']} |")
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
