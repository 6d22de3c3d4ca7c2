"""The KServe v2 / Open Inference Protocol over HTTP, for a text recogniser.

Source: the Open Inference Protocol's REST spec (KServe "V2 Inference Protocol",
``kserve/open-inference-protocol``, ``rest_predict_v2.yaml``) and Triton's binary tensor
data extension (``triton-inference-server/server``, ``docs/protocol/extension_binary_data.md``),
which ``tritonclient.http`` uses; Triton's model configuration and statistics extensions
(``docs/protocol/extension_model_configuration.md``, ``extension_statistics.md``), whose JSON
is the proto3 JSON of ``model_config.proto``'s ``ModelConfig`` and ``grpc_service.proto``'s
``ModelStatistics``, so :mod:`serve.grpc_server` answers the same documents over gRPC.

A text recogniser has one input and two outputs, each a 1-D batch of ``N`` images:

- input ``images``, ``BYTES``: encoded images (PNG, JPEG, ...). In a JSON body each element
  is the image's base64 text (RFC 4648, standard alphabet); with the binary extension each
  element is the raw image bytes, serialised as Triton serialises ``BYTES``: a 4-byte
  little-endian length before each element.
- output ``texts``, ``BYTES``: the recognised strings (UTF-8).
- output ``confidences``, ``FP32``: their confidences in [0, 1].

An image classifier has the same input and two outputs ``[N, k]``, the ``k`` (``--top-k``)
most probable classes of each image, best first: ``labels`` (``BYTES``, UTF-8) and
``probabilities`` (``FP32``).

A shape ``[N]`` or ``[N, 1]`` is accepted for the input. Outputs are JSON unless the request
asks for binary (``parameters.binary_data_output`` true, or ``binary_data`` true on a
requested output): then the JSON header is followed by the binary tensors, and its length is
in the ``Inference-Header-Content-Length`` response header.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import numpy as np

from serve.metrics import ModelStatistics

INPUT_NAME = "images"
TEXTS = "texts"
CONFIDENCES = "confidences"
#: A recogniser's outputs and their datatypes.
OUTPUTS = {TEXTS: "BYTES", CONFIDENCES: "FP32"}
LABELS = "labels"
PROBABILITIES = "probabilities"
#: An image classifier's outputs: ``[N, k]``, the k most probable labels best first.
CLASSIFIER_OUTPUTS = {LABELS: "BYTES", PROBABILITIES: "FP32"}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message says what is wrong."""


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request.

    Attributes:
        id: the request's ``id`` (echoed in the response), or None.
        images: the encoded images, in request order.
        outputs: the outputs to return and whether each is binary, in the order to return.
    """

    id: str | None
    images: list[bytes]
    outputs: list[tuple[str, bool]]


def load_json(text: bytes | str, what: str) -> object:
    """``json.loads`` for a request body: its failures as one :class:`ProtocolError` naming
    ``what``, nesting too deep for the parser included (``json`` raises RecursionError there,
    which would otherwise surface as a 500 with a traceback).

    Raises:
        ProtocolError: not UTF-8, not JSON, or nested too deep.
    """
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply to parse") from None


def model_metadata(name: str, platform: str, outputs: dict[str, str] = OUTPUTS,
                   top_k: int | None = None) -> dict:
    """``GET /v2/models/{name}``: the model's name, versions, platform and tensors
    (a classifier's outputs are ``[-1, top_k]``)."""
    shape = [-1] if top_k is None else [-1, top_k]
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": t, "shape": shape} for n, t in outputs.items()],
    }


#: Triton's ``DataType`` of each v2 datatype this service uses.
CONFIG_DATATYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}
#: The extensions this server implements (``GET /v2``, gRPC ServerMetadata).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")


def model_config(name: str, platform: str, outputs: dict[str, str], top_k: int | None,
                 max_request_images: int, max_batch_size: int, max_wait_ms: float,
                 timeout_ms: float, max_queue: int, device_kind: str = "KIND_CPU") -> dict:
    """``GET /v2/models/{name}/config``: the model's configuration as Triton writes it.

    A request's batch is ``[N]`` images (at most ``max_request_images``: Triton's
    ``max_batch_size``); each element is one encoded image (``dims [1]`` reshaped to a
    scalar), each output one value per image (a classifier's ``[top_k]``). Dynamic batching
    fills engine calls of up to ``max_batch_size`` images (the preferred batch size) within
    ``max_wait_ms``; requests past ``timeout_ms`` are rejected, the queue holds ``max_queue``.
    """
    dims = [1] if top_k is None else [top_k]
    config = {
        "name": name,
        "platform": platform,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_request_images,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "format": "FORMAT_NONE",
                   "dims": [1], "reshape": {"shape": []}}],
        "output": [{"name": n, "data_type": CONFIG_DATATYPES[t], "dims": dims}
                   for n, t in outputs.items()],
        "dynamic_batching": {
            "preferred_batch_size": [max_batch_size],
            "max_queue_delay_microseconds": int(max_wait_ms * 1000),
            "default_queue_policy": {"timeout_action": "REJECT",
                                     "default_timeout_microseconds": int(timeout_ms * 1000),
                                     "max_queue_size": max_queue},
        },
        "instance_group": [{"name": f"{name}_0", "kind": device_kind, "count": 1}],
    }
    if top_k is None:
        for output in config["output"]:
            output["reshape"] = {"shape": []}
    return config


def _duration(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


def model_statistics(name: str, statistics: ModelStatistics) -> dict:
    """``GET /v2/models/{name}/stats``: one model's entry of Triton's statistics document
    (``{"model_stats": [entry]}``), from a ``serve.metrics.ModelStatistics`` snapshot.
    Preprocessing and decoding are not timed per request: ``compute_input`` and
    ``compute_output`` stay zero; ``compute_infer`` is the engine call."""
    zero = _duration(0, 0)
    s = statistics
    return {
        "name": name,
        "version": "1",
        "last_inference": s.last_inference,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success.count, s.success.ns),
            "fail": _duration(s.fail.count, s.fail.ns),
            "queue": _duration(s.queue.count, s.queue.ns),
            "compute_input": zero,
            "compute_infer": _duration(s.compute_infer.count, s.compute_infer.ns),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": zero,
             "compute_infer": _duration(d.count, d.ns), "compute_output": zero}
            for size, d in sorted(s.batches.items())
        ],
    }


def deserialize_bytes(blob: bytes, what: str) -> list[bytes]:
    """Elements of a binary ``BYTES`` tensor: ``(uint32 little-endian length, bytes)*``.

    Raises:
        ProtocolError: a length runs past the end of ``blob``.
    """
    out, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError(f"{what}: a truncated element length at byte {offset}")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(f"{what}: element {len(out)} claims {length} bytes, "
                                f"{len(blob) - offset} remain")
        out.append(blob[offset:offset + length])
        offset += length
    return out


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A binary ``BYTES`` tensor: each element behind its uint32 little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _flatten(data: object, what: str) -> list:
    if not isinstance(data, list):
        raise ProtocolError(f"{what}: 'data' must be a list")
    flat: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _flag(parameters: dict, key: str, default: bool, what: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{what}: parameter {key!r} must be true or false, got {value!r}")
    return value


def parse_infer_request(body: bytes, header_length: str | None,
                        known_outputs: dict[str, str] = OUTPUTS) -> InferRequest:
    """Parse ``POST /v2/models/{name}/infer``.

    Args:
        body: the request body: JSON, or with the binary extension the JSON header followed
            by the binary tensors.
        header_length: the ``Inference-Header-Content-Length`` request header, or None.
        known_outputs: the model's outputs (:data:`OUTPUTS` or :data:`CLASSIFIER_OUTPUTS`).

    Raises:
        ProtocolError: malformed JSON, a missing or unknown tensor, a wrong datatype or
            shape, bad base64, binary sizes that do not add up, or an unknown output.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {length} is outside the body "
                                f"({len(body)} bytes)")
        header, binary = body[:length], body[length:]
    request = load_json(header, "the request header")
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    images: list[bytes] | None = None
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise ProtocolError("each input must be a JSON object")
        name = tensor.get("name")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be a JSON object")
        size = parameters.get("binary_data_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                 or size < 0):
            raise ProtocolError(f"input {name!r}: binary_data_size must be a count of bytes")
        if name != INPUT_NAME:
            raise ProtocolError(f"unknown input {name!r}; the model's input is {INPUT_NAME!r}")
        if images is not None:
            raise ProtocolError(f"input {INPUT_NAME!r} is given twice")
        if tensor.get("datatype") != "BYTES":
            raise ProtocolError(f"input {INPUT_NAME!r} must be BYTES, "
                                f"got {tensor.get('datatype')!r}")
        shape = tensor.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or (len(shape) == 2 and shape[1] != 1)):
            raise ProtocolError(f"input {INPUT_NAME!r}: shape must be [N] or [N, 1], "
                                f"got {shape!r}")
        count = shape[0]
        if size is not None:
            if offset + size > len(binary):
                raise ProtocolError(f"input {INPUT_NAME!r}: binary_data_size {size} runs past "
                                    f"the body's {len(binary) - offset} binary bytes")
            images = deserialize_bytes(binary[offset:offset + size], f"input {INPUT_NAME!r}")
            offset += size
        else:
            images = []
            for index, item in enumerate(_flatten(tensor.get("data"), f"input {INPUT_NAME!r}")):
                if not isinstance(item, str):
                    raise ProtocolError(f"input {INPUT_NAME!r}: element {index} must be a "
                                        f"base64 string")
                try:
                    images.append(base64.b64decode(item, validate=True))
                except binascii.Error as exc:
                    raise ProtocolError(f"input {INPUT_NAME!r}: element {index} is not "
                                        f"base64 ({exc})") from None
        if len(images) != count:
            raise ProtocolError(f"input {INPUT_NAME!r}: shape says {count} elements, "
                                f"the data holds {len(images)}")
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} binary bytes after the JSON header "
                            f"belong to no input")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be a JSON object")
    binary_default = _flag(parameters, "binary_data_output", False, "request")
    wanted = request.get("outputs")
    if wanted is None:
        outputs = [(name, binary_default) for name in known_outputs]
    else:
        if not isinstance(wanted, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for tensor in wanted:
            name = tensor.get("name") if isinstance(tensor, dict) else None
            if not isinstance(name, str) or name not in known_outputs:
                raise ProtocolError(f"unknown output {name!r}; outputs are: "
                                    f"{', '.join(known_outputs)}")
            out_parameters = tensor.get("parameters") or {}
            if not isinstance(out_parameters, dict):
                raise ProtocolError(f"output {name!r}: 'parameters' must be a JSON object")
            outputs.append((name, _flag(out_parameters, "binary_data", binary_default,
                                        f"output {name!r}")))
    request_id = request.get("id")
    return InferRequest(None if request_id is None else str(request_id), images, outputs)


def flatten_output(rows: list) -> tuple[list[int], list]:
    """An output's shape and its values in row-major order: one value per image (``[N]``),
    or one list of ``k`` values per image (``[N, k]``)."""
    nested = bool(rows) and isinstance(rows[0], (list, tuple))
    shape = [len(rows), len(rows[0])] if nested else [len(rows)]
    return shape, ([v for row in rows for v in row] if nested else list(rows))


def binary_tensor(flat: list, datatype: str) -> bytes:
    """A tensor's values as the binary extension (and gRPC's raw contents) carry them:
    ``BYTES`` as length-prefixed UTF-8 (:func:`serialize_bytes`), ``FP32`` little-endian."""
    if datatype == "BYTES":
        return serialize_bytes([str(v).encode("utf-8") for v in flat])
    return np.asarray(flat, "<f4").tobytes()


def encode_infer_response(
    request: InferRequest, model_name: str, results: dict[str, list],
    datatypes: dict[str, str] = OUTPUTS,
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers for a request's results.

    Args:
        request: the parsed request (its id, and the outputs it asks for).
        model_name: the model's name.
        results: output name -> one value per image (shape ``[N]``), or one list of ``k``
            values per image (shape ``[N, k]``); strings for ``BYTES``, numbers for ``FP32``.
        datatypes: output name -> datatype.

    Returns:
        ``(body, headers)``: JSON, or the JSON header followed by the binary outputs with
        ``Inference-Header-Content-Length`` and ``Content-Type: application/octet-stream``.
    """
    response: dict = {"model_name": model_name, "model_version": "1", "outputs": []}
    if request.id is not None:
        response["id"] = request.id
    blobs = []
    for name, binary in request.outputs:
        shape, flat = flatten_output(results[name])
        datatype = datatypes[name]
        tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = binary_tensor(flat, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = ([str(v) for v in flat] if datatype == "BYTES"
                              else [float(v) for v in flat])
        response["outputs"].append(tensor)
    header = json.dumps(response, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        HEADER_LENGTH: str(len(header)),
        "Content-Type": "application/octet-stream",
    }
