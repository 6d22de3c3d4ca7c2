"""Serve a text recogniser, a full OCR pipeline or an image classifier over HTTP, with
dynamic batching.

Loads one model (.onnx fp32 or int8 on ONNX Runtime, .om with its sidecar on ais_bench, or a
.pth with --arch on PyTorch), then answers:

    curl -X POST http://127.0.0.1:8080/service -T word.png     # {"text": ..., "confidence": ...}

and the KServe v2 / Open Inference Protocol at /v2/models/NAME/infer (tritonclient.http works
unchanged) and over gRPC on --grpc-port (tritonclient.grpc), Triton's model configuration and
statistics at /v2/models/NAME/config and /stats, health at /v2/health/live and
/v2/health/ready, Prometheus metrics at /metrics, and a page to try images at /.
With --det, whole images too: a DB text detector (its own batcher, equal input sizes), the
text-direction classifier (--cls) turning upside-down regions, then the recogniser on each
region: POST /ocr (raw image body -> boxes and texts) and POST /ocr/prediction (Paddle
Serving's pipeline JSON). An image classifier as --model (ppocr-cls, or any single-input
ONNX classifier with --labels) answers /service and /v2 with its --top-k labels and
probabilities, best first; its requests batch by input size through the same admission,
deadlines and metrics.

Requests of equal input width (after the model's width policy) share an engine call; a width's
bucket goes to the engine when it holds --max-batch-size requests or its oldest request has
waited --max-wait-ms, and a batch takes at most one lane's share of what is queued (the lanes
split a few requests instead of one running them all). Nothing is padded, so every answer
equals the offline batch-1 answer.

Connections: at most --max-connections open at once (beyond: 503 and closed at once); a
request's headers must arrive within --header-timeout-s and its body within
--body-timeout-s (beyond: 408, connection closed); an idle keep-alive connection is closed
after --keep-alive-s.

SIGTERM or Ctrl-C: readiness turns 503, queued and in-flight requests finish (after
--drain-seconds, during which new requests are still served), then the process exits 0. A
second Ctrl-C exits at once.

Examples:
    python -m serve --model nano_int8.onnx
    python -m serve --model crnn.om --device npu:0 --port 9000 --token-file token.txt
    python -m serve --det                   # PP-OCRv6 det, cls and rec: also /ocr, /ocr/prediction
    python -m serve --model ppocr-v4-rec --det ppocr-v4-det --cls none
    python -m serve --model ppocr-cls       # the direction classifier as a service
    python -m serve --model pets.onnx --labels pets.txt --top-k 3
    python -m serve --model nano_int8.onnx --replicas 2      # 2 replicas on a local Ray Serve
"""

from __future__ import annotations

import argparse
import logging
import resource
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, non_negative, positive, probability, run_main
from common.errors import ToolchainError
from common.ray_cluster import SERVE_INGRESSES
from infer.device import DEVICE_SPELLINGS
from models.cls_spec import read_labels
from models.registry import ARCHS
from pipeline.ocr import (
    CLS_THRESHOLD,
    DEFAULT_CLASSIFIER,
    DEFAULT_DETECTOR,
    DEFAULT_RECOGNIZER,
    PRECISIONS,
)
from preprocess.image import DEFAULT_MAX_PIXELS

logger = logging.getLogger("serve")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


#: Most images in one request by default (a quarter of the default queue).
DEFAULT_MAX_REQUEST_IMAGES = 64
#: File descriptors kept free of connections (the model, logs, pools, the listening socket).
RESERVED_FDS = 64
#: Most connections by default, where the descriptor limit allows.
DEFAULT_MAX_CONNECTIONS = 1000


def connection_cap(requested: int | None) -> int:
    """The connection cap: ``requested``, or :data:`DEFAULT_MAX_CONNECTIONS` lowered to fit
    the process's open-file limit (``RLIMIT_NOFILE``) less :data:`RESERVED_FDS`.

    Raises:
        ToolchainError: ``requested`` does not fit the open-file limit.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else 1 << 20
    if requested is None:
        if room < 1:
            raise ToolchainError(f"the open-file limit ({soft}) leaves no room for "
                                 f"connections; raise it with `ulimit -n`")
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if requested > room:
        raise ToolchainError(f"--max-connections {requested} does not fit the open-file limit "
                             f"({soft}, of which {RESERVED_FDS} are kept for the server); raise "
                             f"it with `ulimit -n` or give at most {max(room, 0)}")
    return requested


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (before the model loads, so a busy port is an
    error at once).

    Raises:
        ToolchainError: the address cannot be resolved or bound (in use, not ours).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ToolchainError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ToolchainError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default=DEFAULT_RECOGNIZER,
                        help="recogniser: .onnx, .om (sidecar JSON beside it) or .pth file, "
                             "or a registry name with public weights (ppocr-v6-rec, "
                             "ppocr-v4-rec, nano-ocr); or an image classifier: a file "
                             "carrying a classifier description (ppocr-cls), or any "
                             f"single-input ONNX classifier with --labels (default "
                             f"{DEFAULT_RECOGNIZER})")
    parser.add_argument("--labels", type=Path,
                        help="label file of an ONNX image classifier (one label per line, in "
                             "class order): serve it as a classifier")
    parser.add_argument("--top-k", type=positive(int), default=5,
                        help="a classifier's answers hold its k most probable labels")
    parser.add_argument("--det", nargs="?", const=DEFAULT_DETECTOR,
                        help="text detector file or registry name (alone: "
                             f"{DEFAULT_DETECTOR}): also serve whole images at POST /ocr and "
                             "/ocr/prediction")
    parser.add_argument("--precision", choices=PRECISIONS, default="int8",
                        help="int8: a registry name with a built int8 copy (python -m "
                             "convert.quantize NAME) serves it where it holds its budget "
                             "(the recogniser alone; with --det, the detector only); fp32: "
                             "never")
    parser.add_argument("--cls", default=DEFAULT_CLASSIFIER,
                        help="with --det: the text-direction classifier turning upside-down "
                             f"crops (file or registry name; default {DEFAULT_CLASSIFIER}; "
                             "'none': no classifier)")
    parser.add_argument("--cls-thresh", type=probability, default=CLS_THRESHOLD,
                        help="a crop read '180' with a higher probability is turned")
    parser.add_argument("--det-max-batch-size", type=positive(int), default=4,
                        help="most images of one input size per detector call")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="architecture of a .pth")
    parser.add_argument("--sidecar", type=Path, help="an .om's sidecar JSON (default: beside)")
    parser.add_argument("--device", help=f"{DEVICE_SPELLINGS} (default: npu:0 for .om, else cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=8080,
                        help="port to listen on (0: any free port, printed at start)")
    parser.add_argument("--grpc-port", type=_port, default=8081,
                        help="port of the KServe v2 gRPC endpoint (tritonclient.grpc) on "
                             "--host; 0: no gRPC")
    parser.add_argument("--name", help="model name in /v2 URLs (default: the file's stem)")
    parser.add_argument("--max-batch-size", type=positive(int), default=16,
                        help="most requests per engine call")
    parser.add_argument("--max-wait-ms", type=non_negative, default=2.0,
                        help="longest a width's oldest request waits for its batch to fill")
    parser.add_argument("--max-queue", type=positive(int), default=256,
                        help="most requests waiting for the engine; beyond: 503 + Retry-After")
    parser.add_argument("--max-request-images", type=positive(int),
                        help="most images in one request (a KServe v2 batch); beyond: 413, so "
                             "one client's batch cannot fill the queue (default: 64, or "
                             "--max-queue if smaller)")
    parser.add_argument("--timeout-ms", type=positive(float), default=10_000.0,
                        help="per-request deadline; past it: 504, and the engine never "
                             "runs the request")
    parser.add_argument("--max-body-bytes", type=positive(int), default=8 << 20,
                        help="largest request body; beyond: 413")
    parser.add_argument("--max-connections", type=positive(int),
                        help=f"most connections open at once; beyond: 503 and closed (default "
                             f"{DEFAULT_MAX_CONNECTIONS}, or fewer to fit `ulimit -n`)")
    parser.add_argument("--header-timeout-s", type=positive(float), default=10.0,
                        help="seconds for a request's headers to arrive (from the connection "
                             "or the previous answer); beyond: 408, connection closed")
    parser.add_argument("--body-timeout-s", type=positive(float), default=30.0,
                        help="seconds for a request's body to arrive; beyond: 408, connection "
                             "closed")
    parser.add_argument("--keep-alive-s", type=positive(float), default=5.0,
                        help="an idle keep-alive connection is closed after this long")
    parser.add_argument("--max-pixels", type=positive(int), default=DEFAULT_MAX_PIXELS,
                        help="largest image (width x height) decoded; beyond: 413")
    parser.add_argument("--min-confidence", type=probability, default=0.5,
                        help="/ocr: regions read with a lower recogniser confidence are dropped")
    parser.add_argument("--no-split-words", dest="split_words", action="store_false",
                        help="/ocr: keep line boxes whole (no cut at recognised spaces)")
    parser.add_argument("--threads", type=positive(int),
                        help="intra-op threads of each engine lane (default: 1 with a lane per "
                             "core for ONNX Runtime on the CPU, else the available cores)")
    parser.add_argument("--lanes", type=positive(int),
                        help="engine lanes: threads each running the next due batch (default: "
                             "one per core for ONNX Runtime on the CPU, else 1)")
    parser.add_argument("--preprocess-threads", type=positive(int), default=1,
                        help="threads decoding and resizing images")
    parser.add_argument("--token-file", type=Path,
                        help="file holding a bearer token every request but the health "
                             "probes must carry (Authorization: Bearer TOKEN)")
    parser.add_argument("--drain-seconds", type=non_negative, default=0.0,
                        help="on SIGTERM, keep serving this long with readiness 503 "
                             "(for load balancers to notice) before stopping")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--replicas", type=positive(int),
                        help="run N replicas of the service on Ray Serve behind its ingress "
                             "on --host:--port (each with its own batcher and engine, one core "
                             "or one NPU each; REST only, no gRPC; needs requirements-ray.txt)")
    parser.add_argument("--ray-ingress", choices=SERVE_INGRESSES, default=SERVE_INGRESSES[0],
                        help="with --replicas: Ray Serve's HAProxy ingress, forwarding straight "
                             "to the replicas (default; its stats and metrics listeners on "
                             "127.0.0.1), or Ray Serve's Python HTTP proxy (slower)")
    parser.add_argument("--address",
                        help="with --replicas: the Ray cluster to join (auto on one of its "
                             "nodes, or the head's HOST:6379); default: a local Ray")
    return parser


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    A token is printable ASCII (RFC 6750's ``b64token`` is a subset): HTTP clients send header
    bytes that servers read as Latin-1, so a non-ASCII token could never match.

    Raises:
        ToolchainError: the file is unreadable, holds no token, or a token with spaces or
            characters outside printable ASCII.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"--token-file {path}: cannot read it ({exc})") from None
    if not token or any(c.isspace() for c in token):
        raise ToolchainError(f"--token-file {path}: must hold one token without spaces")
    odd = next((c for c in token if not (c.isascii() and c.isprintable())), None)
    if odd is not None:
        raise ToolchainError(f"--token-file {path}: the token holds {odd!r}; a bearer token is "
                             "printable ASCII (RFC 6750), as HTTP headers carry it")
    return token


def config_of(args: argparse.Namespace):
    """The :class:`serve.service.ServeConfig` of parsed command-line arguments.

    Raises:
        ToolchainError: ``--token-file`` is unreadable or holds no token, or
            ``--max-request-images`` is over ``--max-queue``.
    """
    from serve.service import ServeConfig

    if args.max_request_images is None:
        args.max_request_images = min(DEFAULT_MAX_REQUEST_IMAGES, args.max_queue)
    if args.max_request_images > args.max_queue:
        raise ToolchainError(f"--max-request-images {args.max_request_images} is over --max-queue "
                             f"{args.max_queue}: such a request could never be admitted")
    return ServeConfig(
        model=args.model,
        name=args.name or Path(args.model).stem,
        det=args.det,
        det_max_batch_size=args.det_max_batch_size,
        cls=None if args.det is None or args.cls == "none" else args.cls,
        cls_threshold=args.cls_thresh,
        labels=read_labels(args.labels) if args.labels else None,
        top_k=args.top_k,
        device=args.device,
        sidecar=args.sidecar,
        arch=args.arch,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_request_images=args.max_request_images,
        timeout_ms=args.timeout_ms,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        max_pixels=args.max_pixels,
        split_words=args.split_words,
        min_confidence=args.min_confidence,
        threads=args.threads,
        lanes=args.lanes,
        preprocess_threads=args.preprocess_threads,
        token=read_token(args.token_file) if args.token_file else None,
        precision=args.precision,
    )


def serve(args: argparse.Namespace) -> int:
    if args.address is not None and args.replicas is None:
        raise ToolchainError("--address names the Ray cluster for --replicas; give --replicas N")
    if args.replicas is not None:
        from serve import replicas

        if args.grpc_port:
            logger.info("--replicas serves REST through Ray Serve's ingress; no gRPC endpoint")
        # Ray Serve's ingress binds the port itself: a busy one is one line here, before Ray
        # starts; --port 0 becomes a free port (the proxy takes a fixed one).
        with listen(args.host, args.port) as sock:
            port = sock.getsockname()[1]
        return replicas.run(config_of(args), args.replicas, args.host, port, args.address,
                            args.ray_ingress, args.drain_seconds, args.access_log)
    import uvicorn

    from serve.app import SERVER_NAME, create_app
    from serve.grpc_server import GrpcEndpoint
    from serve.protocol import ConnectionLimits, guarded_protocol
    from serve.service import Service, State, load_in_background

    config = config_of(args)
    cap = connection_cap(args.max_connections)
    service = Service(config)  # opens the description; the engine loads after binding
    limits = ConnectionLimits(cap, args.header_timeout_s, shed=service.shed)
    sock = listen(args.host, args.port)
    grpc = None
    if args.grpc_port:
        listen(args.host, args.grpc_port).close()  # a busy port: one line, before loading
        grpc = GrpcEndpoint(service, args.host, args.grpc_port, SERVER_NAME, cap)
    failure: list[str] = []

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, draining on the first SIGTERM/SIGINT (readiness 503 first)."""

        def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - signal handler
            if self.should_exit or service.state is State.DRAINING:
                self.force_exit = True
                self.should_exit = True
                return
            logger.info("draining: readiness is 503; finishing queued requests")
            service.begin_drain()
            if args.drain_seconds > 0:
                timer = threading.Timer(args.drain_seconds, self._stop)
                timer.daemon = True
                timer.start()
            else:
                self._stop()

        def _stop(self) -> None:
            self.should_exit = True

    def load_failed(reason: str) -> None:
        failure.append(reason)
        server.should_exit = True

    app = create_app(service, on_startup=lambda: load_in_background(service, load_failed),
                     grpc=grpc, on_failure=load_failed)
    server = DrainingServer(uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        access_log=args.access_log,
        http=guarded_protocol(limits),
        timeout_keep_alive=args.keep_alive_s,
        timeout_graceful_shutdown=int(args.timeout_ms / 1000) + 5,
        lifespan="on",
    ))
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    logger.info("listening on %s: POST %s/service, /v2/models/%s/infer%s (Ctrl-C to stop)",
                url, url, config.name, ", /ocr, /ocr/prediction" if args.det else "")
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise ToolchainError(f"{args.model}: {failure[0]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
