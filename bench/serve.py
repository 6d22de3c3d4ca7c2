"""Load the HTTP service from this machine and compare it with the offline recogniser.

One run, on the same model (int8 nano-ocr, built as ``bench.e2e`` builds it unless --model
is given) and the same IIIT5K images (encoded bytes from the lmdb):

1. offline: ``pipeline.Recognizer`` on all images in memory, batch 16, in this process
   (decode, resize, equal-width batches, engine, CTC): the ceiling for the service.
2. the service, ``python -m serve`` in a child process with its defaults (batches of up to
   16 per width, 2 ms wait), at 1, 8, 32 and 64 requests in flight;
3. the same service with ``--max-batch-size 1`` (no batching), at the same loads;
4. overload: the batched service with a small queue (``--max-queue 16``, ``--timeout-ms
   1000``) offered 4x the rate the batched service reached at 32 in flight, open loop (a
   request every 1/rate seconds whatever the answers), for --overload-seconds: beyond
   capacity it should answer 503 (with Retry-After), and no accepted request should miss its
   deadline (a 504).

The load tool is a small asyncio client on aiohttp (one keep-alive connection per request in
flight, each posting the next image as soon as its answer arrives; ``POST /service`` with the
raw image as the body). It runs on the same 2 cores as the server, so the service's figures
include the client's cost. Every load level is bounded in requests (--requests) and time
(--seconds). Server memory is ``VmRSS`` of the server process before and after the load.

With ``--predictions P.csv`` the texts the batched service answered at 32 in flight are
written as an ``eval.postprocess``-style predictions file (index, prediction, confidence), for
``python -m eval.compare`` against the offline batch-1 path (see docs/results/README.md).

Example (docs/results/README.md's table):
    python -m bench.serve
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _open_loop(url: str, images: list[bytes], rate: float, seconds: float,
                     outstanding_cap: int) -> dict:
    import aiohttp

    statuses: Counter = Counter()
    latencies: list[float] = []
    outstanding = 0

    async def send(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal outstanding
        start = time.perf_counter()
        try:
            async with session.post(url + "/service", data=images[index % len(images)]) as answer:
                await answer.read()
                statuses[answer.status] += 1
                if answer.status == 200:
                    latencies.append(time.perf_counter() - start)
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] += 1
        finally:
            outstanding -= 1

    connector = aiohttp.TCPConnector(limit=outstanding_cap)
    timeout = aiohttp.ClientTimeout(total=60)
    tasks = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        for index in range(int(rate * seconds)):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= outstanding_cap:
                statuses["not sent (client at its cap)"] += 1
                continue
            outstanding += 1
            tasks.append(asyncio.create_task(send(session, index)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    latencies.sort()
    return {"offered_per_s": rate, "statuses": dict(statuses),
            "ok_per_s": len(latencies) / wall,
            "max_ms": 1000 * latencies[-1] if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}


def overload(url: str, images: list[bytes], rate: float, seconds: float,
             outstanding_cap: int = 1024) -> dict:
    """Open-loop load: a request every ``1 / rate`` seconds for ``seconds``, whatever the
    answers (at most ``outstanding_cap`` unanswered; beyond, sends are skipped and counted).

    Returns:
        statuses by code, 200s per second, the slowest and p99 200 in ms (client-measured:
        from sending, so including time in the client and the kernel's accept queue).
    """
    return asyncio.run(_open_loop(url, images, rate, seconds, outstanding_cap))


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
    parser.add_argument("--overload-seconds", type=positive(float), default=5.0,
                        help="length of the open-loop overload run")
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
            _, _, model, build_seconds = build_models(Path(tmp), args.calibration)
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
        with ServerProcess(["--model", str(model), "--max-queue", "16",
                            "--timeout-ms", "1000"]) as server:
            flood = overload(server.url, images, 4 * saturation, args.overload_seconds)
    if args.predictions is not None:
        answered = batched["rows"][levels.index(32)]["answers"]
        write_predictions(args.predictions, answered)
        print(f"wrote {len(answered)} answers (32 in flight) to {args.predictions}")
    _print_rows("service, batched (--max-batch-size 16 --max-wait-ms 2)", batched, unbatched,
                base["images_per_s"])
    _print_rows("service, unbatched (--max-batch-size 1)", unbatched, None, base["images_per_s"])
    late = flood["max_ms"] is not None and flood["max_ms"] > 1000
    print(f"\noverload: open loop at {flood['offered_per_s']:.0f} requests/s (4x the batched "
          f"service at 32 in flight) for {args.overload_seconds:g} s, --max-queue 16 "
          f"--timeout-ms 1000: statuses {flood['statuses']}; {flood['ok_per_s']:.0f} img/s "
          f"answered; 200s: p99 {_fmt(flood['p99_ms'], '.0f')} ms, slowest "
          f"{_fmt(flood['max_ms'], '.0f')} ms client-side"
          f"{' (past the 1000 ms deadline)' if late else ' (within the 1000 ms deadline)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
