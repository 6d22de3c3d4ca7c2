"""The HTTP layer (FastAPI): parse and validate, then hand images to :class:`Service`.

Endpoints:

- ``POST /service``: the image file as the raw body (``curl -X POST URL/service -T img.jpg``)
  -> ``{"text": str, "confidence": float}``; for an image classifier ``{"labels":
  [{"label": str, "probability": float}, ...]}``, the ``--top-k`` most probable, best first.
- ``POST /v2/models/{name}[/versions/1]/infer``: KServe v2 / Open Inference Protocol
  (:mod:`serve.kserve`), so ``tritonclient.http`` works unchanged.
- ``GET /v2``, ``GET /v2/models/{name}``: server and model metadata.
- ``GET /v2/health/live``: 200 while the process runs.
- ``GET /v2/health/ready``, ``GET /v2/models/{name}/ready``: 200 once the model is loaded and
  warmed up; 503 before, while draining, or when loading failed.
- ``GET /v2/models/{name}/config``, ``GET /v2/models[/{name}]/stats``: Triton's model
  configuration and statistics extensions (``tritonclient``'s ``get_model_config`` and
  ``get_inference_statistics``).
- ``GET /metrics``: Prometheus text (:mod:`serve.metrics`).
- ``GET /``: a page to try an image in a browser (``serve/page.html``: choose or drop an
  image; the boxes, texts and confidences drawn on it, the answer's latency).
- With a detector (``--det``), whole images:
  ``POST /ocr``: the image file as the raw body -> ``{"words": [{"points": [[x, y] x 4],
  "text", "confidence"}], "dropped": {reason: count}}`` (points clockwise, pixels);
  ``POST /ocr/prediction``: Paddle Serving's pipeline format, as its OCR example's
  ``pipeline_http_client.py`` sends and reads it: ``{"key": ["image"], "value": [base64]}``
  in; ``{"err_no": 0, "err_msg": "", "key": ["res"], "value": [repr of [[text, points],
  ...]]}`` out (the client ``eval``s the value). Errors there carry ``err_no`` (the HTTP
  status) and ``err_msg`` beside ``error``.

Errors are ``{"error": "<one line>"}`` with the status (the protocol's error format), on every
endpoint. When a token is set, every endpoint but the two health probes and the page needs
it (the page asks for it).

A request is admitted or refused (503, 504) once its headers are in, before its body is read
(:meth:`serve.service.Service.admit`); its deadline runs from its arrival, which
:mod:`serve.protocol` stamps when the request's first byte is parsed (the handler's start
where another server runs the app). A body that does not arrive within ``body_timeout_s`` is
answered 408 and the connection closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import ToolchainError
from serve import kserve
from serve.grpc_server import GrpcEndpoint
from serve.service import Service, ServiceError, State
from serve.v2 import V2Model

SERVER_NAME = "crnn-ascend-toolchain"


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return Response(body, status, headers, media_type="application/json")


def _error(exc: ServiceError) -> Response:
    return _json({"error": exc.message}, exc.status, exc.headers)


def _pipeline_error(exc: ServiceError) -> Response:
    """An error in Paddle Serving's pipeline fields (``err_no`` the status), ours beside."""
    return _json({"err_no": exc.status, "err_msg": exc.message, "key": [], "value": [],
                  "error": exc.message}, exc.status, exc.headers)


def arrival_of(request: Request) -> float:
    """When ``request`` arrived (``time.monotonic()``): stamped by :mod:`serve.protocol` at
    its first byte; now, under a server that does not stamp it."""
    return getattr(request.state, "arrival", None) or time.monotonic()


async def read_body(request: Request, cap: int, expected: str = "the image file",
                    timeout_s: float | None = None) -> bytes:
    """The request body, refused past ``cap`` bytes before it is all read; ``expected`` names
    what the body should hold (for the empty-body message).

    Args:
        timeout_s: seconds for the whole body to arrive (None: no limit).

    Raises:
        ServiceError: 400 for an empty body, a bad Content-Length or a client that left
            mid-body; 413 over the cap; 408 (the connection then closes) past ``timeout_s``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, cap, expected)
    except TimeoutError:
        raise ServiceError(408, f"the request body did not arrive within {timeout_s:g} s "
                                f"(--body-timeout-s)", {"Connection": "close"}) from None


async def _read_body(request: Request, cap: int, expected: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, f"Content-Length is not a byte count: {declared!r}")
        if int(declared) > cap:
            raise ServiceError(413, f"the body is {declared} bytes, over the cap of {cap} "
                                    f"(--max-body-bytes)")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise ServiceError(413, f"the body is over the cap of {cap} bytes "
                                        f"(--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(400, "the client closed the connection before the whole body "
                                "arrived") from None
    if total == 0:
        raise ServiceError(400, f"the request body is empty; send {expected} as the body")
    return b"".join(chunks)


def pipeline_request_image(body: bytes) -> bytes:
    """The image of a Paddle Serving pipeline request ``{"key": ["image"], "value": [b64]}``.

    Raises:
        ServiceError: 400 naming what is wrong (not JSON, keys and values not lists of one
            length, no ``image`` key, value not base64).
    """
    try:
        data = kserve.load_json(body, "the body")
    except kserve.ProtocolError as exc:
        raise ServiceError(400, str(exc)) from None
    if not isinstance(data, dict):
        raise ServiceError(400, 'the body must be {"key": ["image"], "value": [base64]}')
    keys, values = data.get("key"), data.get("value")
    if not (isinstance(keys, list) and isinstance(values, list) and len(keys) == len(values)):
        raise ServiceError(400, '"key" and "value" must be lists of the same length')
    if "image" not in keys:
        raise ServiceError(400, f'no "image" among the keys {keys}')
    encoded = values[keys.index("image")]
    if not isinstance(encoded, str):
        raise ServiceError(400, 'the "image" value must be a base64 string')
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ServiceError(400, f'the "image" value is not base64 ({exc})') from None


#: The page served at ``/``; ``__PAGE_CONFIG__`` is replaced by :func:`page_config`'s JSON.
PAGE = Path(__file__).with_name("page.html")


def page_html(config: dict) -> str:
    """The page with ``config`` in its script (``<`` escaped, so no text closes the tag)."""
    text = json.dumps(config, ensure_ascii=False).replace("<", "\\u003c")
    return PAGE.read_text(encoding="utf-8").replace("__PAGE_CONFIG__", text)


def page_config(service: Service, model_api: V2Model) -> dict:
    """What the page needs: the model's name, kind and backend, the detector's name, the
    endpoints it can send to (``ocr`` first with a detector), whether a token is needed."""
    kind = "classifier" if model_api.classifier else "recogniser"
    detector = service.config.det
    return {"model": model_api.name, "kind": kind, "backend": service.backend.name,
            "detector": None if detector is None else Path(str(detector)).stem,
            "endpoints": (["ocr"] if detector is not None else []) + ["service"],
            "token": service.config.token is not None}


class Shortcut:
    """The ASGI application in front of the FastAPI one: a ``POST`` to one of ``routes``'
    exact paths goes straight to its handler, past the framework's middleware, routing and
    dependency solving (on a 2-core EPYC, about 100 us of the 450 us of event-loop time a
    recognised image took); any other request (and lifespan events), and the same handlers
    at other spellings of their paths, go to the application. The handlers answer their own
    errors; an exception escaping one is a bug, which the server logs and answers 500.

    Args:
        app: the FastAPI application.
        routes: exact path -> ``async handler(request) -> Response``.
    """

    def __init__(self, app: ASGIApp, routes: dict[str, Callable[[Request],
                                                                Awaitable[Response]]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service, on_startup: Callable[[], None] | None = None,
               grpc: GrpcEndpoint | None = None,
               on_failure: Callable[[str], None] | None = None) -> Shortcut:
    """The ASGI application serving ``service``: the FastAPI one behind its
    :class:`Shortcut` for the inference endpoints.

    Args:
        service: the (not yet loaded) service; ``on_startup`` starts loading it.
        on_startup: called once the event loop runs (``serve.__main__`` loads the model on a
            thread there); None: the caller loads the service itself.
        grpc: the gRPC endpoint to run beside REST on the same event loop (started before
            the model loads, stopped after REST has drained), or None.
        on_failure: called with the one-line reason when ``grpc`` cannot bind (the server
            then exits); None: the ToolchainError propagates.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = True
        if grpc is not None:
            try:
                await grpc.start()
            except ToolchainError as exc:
                if on_failure is None:
                    raise
                on_failure(str(exc))
                started = False
        if on_startup is not None and started:
            on_startup()
        yield
        if grpc is not None:
            await grpc.stop(service.config.timeout_ms / 1000.0)
        service.close()

    app = FastAPI(title="scene-text recognition", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    model_api = V2Model(service)
    name = model_api.name
    metrics = service.metrics
    top_k = model_api.top_k

    async def answer(endpoint: str, work: Callable[[], Awaitable[Response]],
                     error: Callable[[ServiceError], Response] = _error,
                     arrival: float | None = None) -> Response:
        """Run ``work``; its ServiceError as ``error``'s response; the latency (from
        ``arrival``, default now) and status counted."""
        start = time.monotonic() if arrival is None else arrival
        try:
            response = await work()
        except ServiceError as exc:
            response = error(exc)
        metrics.observe_request(endpoint, response.status_code, time.monotonic() - start)
        return response

    check_model = model_api.check_model

    async def body_of(request: Request, arrival: float, expected: str = "the image file",
                      whole_image: bool = False) -> bytes:
        """Admit the request on its headers, then read its body."""
        service.admit(arrival, whole_image)
        return await read_body(request, service.config.max_body_bytes, expected,
                               service.config.body_timeout_s)

    @app.post("/service")
    async def service_endpoint(request: Request) -> Response:
        arrival = arrival_of(request)

        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            body = await body_of(request, arrival)
            if service.classifier is not None:
                (result,) = await service.classify([body], arrival)
                return _json({"labels": [{"label": label, "probability": probability}
                                         for label, probability in result.top(top_k)]})
            (decoded,) = await service.recognise([body], arrival)
            return _json({"text": decoded.text, "confidence": decoded.confidence})

        return await answer("service", work, arrival=arrival)

    @app.post("/ocr")
    async def ocr_endpoint(request: Request) -> Response:
        arrival = arrival_of(request)

        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            body = await body_of(request, arrival, whole_image=True)
            result = await service.ocr(body, arrival)
            return _json({"words": [w.as_json() for w in result.words],
                          "dropped": result.dropped})

        return await answer("ocr", work, arrival=arrival)

    @app.post("/ocr/prediction")
    async def ocr_prediction_endpoint(request: Request) -> Response:
        arrival = arrival_of(request)

        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            body = await body_of(request, arrival,
                                 'the JSON {"key": ["image"], "value": [base64]}',
                                 whole_image=True)
            image = pipeline_request_image(body)
            result = await service.ocr(image, arrival)
            value = repr([[w.text, w.as_json()["points"]] for w in result.words])
            return _json({"err_no": 0, "err_msg": "", "key": ["res"], "value": [value]})

        return await answer("ocr_prediction", work, _pipeline_error, arrival)

    async def infer(request: Request, model: str, version: str | None) -> Response:
        arrival = arrival_of(request)

        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            check_model(model, version)
            if request.headers.get("content-encoding", "identity") != "identity":
                raise ServiceError(415, f"Content-Encoding "
                                        f"{request.headers['content-encoding']!r} is not "
                                        f"supported; send the body uncompressed")
            body = await body_of(request, arrival, "a KServe v2 inference request")
            try:
                parsed = kserve.parse_infer_request(
                    body, request.headers.get(kserve.HEADER_LENGTH.lower()), model_api.outputs)
            except kserve.ProtocolError as exc:
                raise ServiceError(400, str(exc)) from None
            results = await model_api.infer(parsed.images, arrival)
            payload, headers = kserve.encode_infer_response(parsed, name, results,
                                                            model_api.outputs)
            return Response(payload, 200, headers)

        return await answer("infer", work, arrival=arrival)

    @app.post("/v2/models/{model}/infer")
    async def infer_endpoint(request: Request, model: str) -> Response:
        return await infer(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version_endpoint(request: Request, model: str, version: str) -> Response:
        return await infer(request, model, version)

    @app.get("/v2")
    async def server_metadata(request: Request) -> Response:
        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            return _json({"name": SERVER_NAME, "version": "1",
                          "extensions": list(kserve.EXTENSIONS)})

        return await answer("metadata", work)

    async def model_document(request: Request, model: str, version: str | None,
                             document: Callable[[], dict]) -> Response:
        async def work() -> Response:
            service.check_token(request.headers.get("authorization"))
            check_model(model, version)
            return _json(document())

        return await answer("metadata", work)

    def statistics_document() -> dict:
        return {"model_stats": [model_api.statistics()]}

    @app.get("/v2/models/stats")
    async def all_statistics(request: Request) -> Response:
        return await model_document(request, name, None, statistics_document)

    @app.get("/v2/models/{model}")
    async def model_metadata(request: Request, model: str) -> Response:
        return await model_document(request, model, None, model_api.metadata)

    @app.get("/v2/models/{model}/config")
    async def model_config(request: Request, model: str) -> Response:
        return await model_document(request, model, None, model_api.config)

    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_version_config(request: Request, model: str, version: str) -> Response:
        return await model_document(request, model, version, model_api.config)

    @app.get("/v2/models/{model}/stats")
    async def model_statistics(request: Request, model: str) -> Response:
        return await model_document(request, model, None, statistics_document)

    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_version_statistics(request: Request, model: str, version: str
                                       ) -> Response:
        return await model_document(request, model, version, statistics_document)

    page = page_html(page_config(service, model_api))

    @app.get("/")
    async def page_endpoint() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    def readiness() -> Response:
        if service.state is State.READY:
            return _json({"ready": True})
        reason = {
            State.LOADING: "the model is loading",
            State.DRAINING: "the server is shutting down",
            State.FAILED: f"the model failed to load: {service.failure}",
        }[service.state]
        return _json({"ready": False, "error": reason}, 503)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return readiness()

    @app.get("/v2/models/{model}/ready")
    async def model_ready(request: Request, model: str) -> Response:
        service.check_token(request.headers.get("authorization"))  # errors: service_error
        check_model(model)
        return readiness()

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        service.check_token(request.headers.get("authorization"))  # errors: service_error
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Routing errors (404 unknown path, 405 wrong method) in the same {"error": ...} form.
        return _json({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                     exc.status_code, dict(exc.headers or {}))

    return Shortcut(app, {
        "/service": service_endpoint,
        "/ocr": ocr_endpoint,
        "/ocr/prediction": ocr_prediction_endpoint,
        f"/v2/models/{name}/infer": lambda request: infer(request, name, None),
    })


__all__ = ["Shortcut", "arrival_of", "create_app", "read_body"]
