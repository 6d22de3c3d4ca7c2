"""The KServe v2 / Open Inference Protocol over gRPC, beside the REST endpoints.

Source: the protocol's gRPC definition (``GRPCInferenceService`` in KServe's
``open-inference-protocol``, ``grpc_predict_v2.proto``) as Triton extends it
(``triton-inference-server/common``, ``grpc_service.proto`` and ``model_config.proto``). The
messages and the service stub are those generated from Triton's .proto and shipped in
``tritonclient[grpc]``, so ``tritonclient.grpc`` and this server read the same definition.

Served on its own port (``python -m serve --grpc-port``), on the same event loop, the same
:class:`serve.service.Service` and the same model operations (:class:`serve.v2.V2Model`) as
REST: the same admission, deadlines (from the call's arrival), bearer token (the
``authorization`` metadata key, ``Bearer TOKEN``) and metrics (endpoint ``grpc_infer`` for
ModelInfer, ``grpc_metadata`` for the rest). Implemented: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer, ModelConfig and ModelStatistics; the other
methods of Triton's service answer UNIMPLEMENTED. As over REST, the two server health
probes need no token.

ModelInfer takes the input ``images`` (``BYTES``, shape ``[N]`` or ``[N, 1]``) either as
``contents.bytes_contents`` or, as ``tritonclient.grpc`` sends it, in ``raw_input_contents``
(each element behind its uint32 little-endian length); outputs come back in
``raw_output_contents``, as Triton answers. An error's status maps to a gRPC code
(:data:`GRPC_CODES`); its message is the REST answer's ``error`` line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from common.errors import ToolchainError
from serve import kserve
from serve.service import Service, ServiceError, State
from serve.v2 import V2Model

logger = logging.getLogger(__name__)

#: The gRPC status code of each HTTP status the service answers.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: A gRPC connection idle this long is closed (clients reconnect on their next call).
IDLE_CONNECTION_MS = 300_000


def parse_infer_request(request: service_pb2.ModelInferRequest,
                        known_outputs: dict[str, str]) -> kserve.InferRequest:
    """The images and requested outputs of a ModelInfer request.

    Raises:
        kserve.ProtocolError: no input or another input than ``images``, a wrong datatype or
            shape, raw contents that do not match the inputs or the shape, an unknown output.
    """
    if len(request.inputs) != 1:
        raise kserve.ProtocolError(f"the request must hold one input, {kserve.INPUT_NAME!r}; "
                                   f"it holds {len(request.inputs)}")
    tensor = request.inputs[0]
    name = kserve.INPUT_NAME
    if tensor.name != name:
        raise kserve.ProtocolError(f"unknown input {tensor.name!r}; the model's input is "
                                   f"{name!r}")
    if tensor.datatype != "BYTES":
        raise kserve.ProtocolError(f"input {name!r} must be BYTES, got {tensor.datatype!r}")
    shape = list(tensor.shape)
    if not 1 <= len(shape) <= 2 or any(d < 0 for d in shape) or (len(shape) == 2
                                                                 and shape[1] != 1):
        raise kserve.ProtocolError(f"input {name!r}: shape must be [N] or [N, 1], got {shape}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise kserve.ProtocolError(f"raw_input_contents holds {len(raw)} tensors for one "
                                       f"input")
        if tensor.contents.bytes_contents:
            raise kserve.ProtocolError(f"input {name!r} is given both in contents and in "
                                       f"raw_input_contents")
        images = kserve.deserialize_bytes(raw[0], f"input {name!r}")
    else:
        images = list(tensor.contents.bytes_contents)
    if len(images) != shape[0]:
        raise kserve.ProtocolError(f"input {name!r}: shape says {shape[0]} elements, the "
                                   f"data holds {len(images)}")
    outputs = []
    for wanted in request.outputs or [None]:
        if wanted is None:
            outputs = [(n, True) for n in known_outputs]
            break
        if wanted.name not in known_outputs:
            raise kserve.ProtocolError(f"unknown output {wanted.name!r}; outputs are: "
                                       f"{', '.join(known_outputs)}")
        outputs.append((wanted.name, True))
    return kserve.InferRequest(request.id or None, images, outputs)


def infer_response(request: kserve.InferRequest, model_name: str, results: dict[str, list],
                   datatypes: dict[str, str]) -> service_pb2.ModelInferResponse:
    """The ModelInfer response: each requested output's shape in ``outputs`` and its data in
    ``raw_output_contents`` (``BYTES`` length-prefixed UTF-8, ``FP32`` little-endian)."""
    response = service_pb2.ModelInferResponse(model_name=model_name, model_version="1",
                                              id=request.id or "")
    for name, _ in request.outputs:
        shape, flat = kserve.flatten_output(results[name])
        response.outputs.add(name=name, datatype=datatypes[name], shape=shape)
        response.raw_output_contents.append(kserve.binary_tensor(flat, datatypes[name]))
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's ``GRPCInferenceService`` for one :class:`serve.service.Service`."""

    def __init__(self, service: Service, server_name: str) -> None:
        self.service = service
        self.model = V2Model(service)
        self.server_name = server_name

    async def _answer(self, endpoint: str, context: grpc.aio.ServicerContext,
                      work: Callable[[], Awaitable[object]], token: bool = True,
                      arrival: float | None = None) -> object:
        """Run ``work`` (after the token check); a ServiceError aborts the call with its code
        and message (``retry-after`` in the trailing metadata for a full queue); the answer
        is counted in the metrics."""
        start = time.monotonic() if arrival is None else arrival
        try:
            if token:
                metadata = dict(context.invocation_metadata() or ())
                self.service.check_token(metadata.get("authorization"))
            result = await work()
        except ServiceError as exc:
            self.service.metrics.observe_request(endpoint, exc.status, time.monotonic() - start)
            if "Retry-After" in exc.headers:
                context.set_trailing_metadata((("retry-after", exc.headers["Retry-After"]),))
            await context.abort(GRPC_CODES.get(exc.status, grpc.StatusCode.UNKNOWN),
                                exc.message)
        self.service.metrics.observe_request(endpoint, 200, time.monotonic() - start)
        return result

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.service.state is State.READY)

    async def ModelReady(self, request, context):  # noqa: N802
        async def work():
            self.model.check_model(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=self.service.state is State.READY)

        return await self._answer("grpc_metadata", context, work)

    async def ServerMetadata(self, request, context):  # noqa: N802
        async def work():
            return service_pb2.ServerMetadataResponse(name=self.server_name, version="1",
                                                      extensions=list(kserve.EXTENSIONS))

        return await self._answer("grpc_metadata", context, work)

    async def ModelMetadata(self, request, context):  # noqa: N802
        async def work():
            self.model.check_model(request.name, request.version)
            return json_format.ParseDict(self.model.metadata(),
                                         service_pb2.ModelMetadataResponse())

        return await self._answer("grpc_metadata", context, work)

    async def ModelConfig(self, request, context):  # noqa: N802
        async def work():
            self.model.check_model(request.name, request.version)
            config = json_format.ParseDict(self.model.config(), model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=config)

        return await self._answer("grpc_metadata", context, work)

    async def ModelStatistics(self, request, context):  # noqa: N802
        async def work():
            if request.name:  # no name: every model's (this server's one)
                self.model.check_model(request.name, request.version)
            return json_format.ParseDict({"model_stats": [self.model.statistics()]},
                                         service_pb2.ModelStatisticsResponse())

        return await self._answer("grpc_metadata", context, work)

    async def ModelInfer(self, request, context):  # noqa: N802
        arrival = time.monotonic()

        async def work():
            self.model.check_model(request.model_name, request.model_version)
            self.service.admit(arrival)
            try:
                parsed = parse_infer_request(request, self.model.outputs)
            except kserve.ProtocolError as exc:
                raise ServiceError(400, str(exc)) from None
            results = await self.model.infer(parsed.images, arrival)
            return infer_response(parsed, self.model.name, results, self.model.outputs)

        return await self._answer("grpc_infer", context, work, arrival=arrival)


class GrpcEndpoint:
    """The gRPC server of one service: bound and started on the running event loop.

    Args:
        service: the service it answers for.
        host, port: the address to listen on (port 0: any free port; :attr:`port` then says
            which).
        server_name: the name ServerMetadata reports.
        max_concurrent_rpcs: calls in progress at once; beyond, RESOURCE_EXHAUSTED.
    """

    def __init__(self, service: Service, host: str, port: int, server_name: str,
                 max_concurrent_rpcs: int) -> None:
        self.service = service
        self.host, self.port = host, port
        self.server_name = server_name
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            ToolchainError: the address cannot be bound.
        """
        limit = self.service.config.max_body_bytes
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0),  # a busy port is an error, not shared
                     ("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.service, self.server_name), server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise ToolchainError(f"cannot listen for gRPC on {self.address} ({exc})") from None
        if port == 0:
            raise ToolchainError(f"cannot listen for gRPC on {self.address}")
        self.port = port
        await server.start()
        self._server = server
        logger.info("gRPC (KServe v2) on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls; calls in progress get ``grace_s`` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


__all__ = ["GRPC_CODES", "GrpcEndpoint", "InferenceServicer", "infer_response",
           "parse_infer_request"]
