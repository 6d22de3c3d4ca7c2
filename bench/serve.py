"""Load the HTTP service from this machine and compare it with the offline recogniser.

One run, on the same model (int8 nano-ocr, built as ``bench.e2e`` builds it unless --model
is given) and the same IIIT5K images (encoded bytes from the lmdb):

1. offline: ``pipeline.Recognizer`` on all images in memory, batch 16, in this process
   (decode, resize, equal-width batches, engine, CTC): the ceiling for the service.
2. the service, ``python -m serve`` in a child process with its defaults (batches of up to
   16 per width, 5 ms wait), at 1, 8, 32 and 64 requests in flight;
3. the same service with ``--max-batch-size 1`` (no batching), at the same loads;
4. overload: the batched service with a small queue (``--max-queue 16``, ``--timeout-ms
   1000``) at 128 in flight, about 4x what saturates it: beyond capacity only 503s, and no
   accepted request answered past its deadline.

The load tool is a small asyncio client on aiohttp (one keep-alive connection per request in
flight, each posting the next image as soon as its answer arrives; ``POST /service`` with the
raw image as the body). It runs on the same 2 cores as the server, so the service's figures
include the client's cost. Every load level is bounded in requests (--requests) and time
(--seconds). Server memory is ``VmRSS`` of the server process before and after the load.

Example (the README's table):
    python -m bench.serve
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from convert.cli import make_parser, run_main
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
    texts: dict[int, str] = {}
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
                texts[index] = payload["text"]

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
        "texts": texts,
    }


def load(url: str, images: list[bytes], in_flight: int, requests: int, seconds: float) -> dict:
    """Post images to ``url``/service with ``in_flight`` requests outstanding, until
    ``requests`` are answered or ``seconds`` pass.

    Returns:
        sent/ok counts, images/s (answered 200 per wall second), p50/p99/max latency in ms,
        statuses by code (or client error name), and the texts by image index.
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


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path,
                        help="model to serve (default: int8 nano-ocr, built as bench.e2e does)")
    parser.add_argument("--data", type=Path, default=default_test_set(),
                        help="lmdb of images ($IIIT5K_LMDB)")
    parser.add_argument("--calibration", type=Path, default=default_calibration_set(),
                        help="lmdb for int8 calibration when building the model")
    parser.add_argument("--requests", type=int, default=3000,
                        help="requests per load level (images are reused past the set's end)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time cap per load level")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)),
                        help="requests in flight, comma-separated")
    return parser


def _run(args) -> int:
    from bench.e2e import build_models

    levels = [int(n) for n in args.levels.split(",")]
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
        with ServerProcess(["--model", str(model), "--max-queue", "16",
                            "--timeout-ms", "1000"]) as server:
            overload = load(server.url, images, 128, args.requests, args.seconds)
    _print_rows("service, batched (--max-batch-size 16 --max-wait-ms 5)", batched, unbatched,
                base["images_per_s"])
    _print_rows("service, unbatched (--max-batch-size 1)", unbatched, None, base["images_per_s"])
    statuses = overload["statuses"]
    late = overload["max_ms"] is not None and overload["max_ms"] > 1000
    print(f"\noverload: 128 in flight, --max-queue 16 --timeout-ms 1000: statuses {statuses}; "
          f"{overload['images_per_s']:.0f} img/s answered; slowest 200 "
          f"{_fmt(overload['max_ms'], '.0f')} ms"
          f"{' (past the deadline!)' if late else ' (within the deadline)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
