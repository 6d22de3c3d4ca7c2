"""The KServe v2 gRPC endpoint and Triton's configuration and statistics extensions, on a
real server process, read by Triton's own clients (``tritonclient.grpc`` and ``.http``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from common.cli import REPO_ROOT
from serve.process import ServerProcess
from tests.serve.test_service import TOKEN, offline_batch_1, real_words

NAME = "crnn"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def auth() -> dict[str, str]:
    """A fresh copy of the token header: tritonclient.http adds its own entries to the
    headers dict it is given (Inference-Header-Content-Length, an int)."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def model(exported):
    return exported["nano-ocr"]


@pytest.fixture(scope="module")
def server(model, token_file):
    with ServerProcess(["--model", str(model), "--name", NAME, "--token-file", str(token_file),
                        "--max-batch-size", "8", "--max-request-images", "32",
                        "--max-wait-ms", "3"]) as running:
        yield running


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token.txt"
    path.write_text(TOKEN)
    return path


def grpc_tensor(images: list[bytes]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_tritonclient_grpc_answers_equal_rest_and_offline(server, model):
    images = real_words(48)
    expected = offline_batch_1(model, images)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME, headers=AUTH)
    metadata = client.get_model_metadata(NAME, headers=AUTH, as_json=True)
    assert [t["name"] for t in metadata["outputs"]] == ["texts", "confidences"]
    assert client.get_server_metadata(headers=AUTH).name == "crnn-ascend-toolchain"

    def one(image: bytes):  # one image per call, 8 in flight: the batcher forms batches
        result = client.infer(NAME, [grpc_tensor([image])], headers=AUTH)
        return result.as_numpy("texts")[0].decode(), float(result.as_numpy("confidences")[0])

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, images))
    assert [text for text, _ in served] == [e.text for e in expected]
    np.testing.assert_allclose([c for _, c in served], [e.confidence for e in expected],
                               rtol=1e-4)

    # a batch of 5 in one call, one output requested, with an id: as REST answers it
    result = client.infer(NAME, [grpc_tensor(images[:5])], headers=AUTH, request_id="g1",
                          outputs=[triton_grpc.InferRequestedOutput("texts")])
    assert [t.decode() for t in result.as_numpy("texts")] == [e.text for e in expected[:5]]
    assert result.as_numpy("confidences") is None
    assert result.get_response().id == "g1"
    rest = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("images", [5], "BYTES")
    tensor.set_data_from_numpy(np.array(images[:5], dtype=np.object_))
    rest_texts = rest.infer(NAME, [tensor], headers=auth()).as_numpy("texts")
    assert list(rest_texts) == list(result.as_numpy("texts"))


def test_grpc_errors_carry_the_protocols_codes(server):
    import grpc

    client = triton_grpc.InferenceServerClient(server.grpc_address)
    image = real_words(1)
    cases = [
        (lambda: client.infer(NAME, [grpc_tensor(image)]), grpc.StatusCode.UNAUTHENTICATED,
         "bearer token"),
        (lambda: client.infer("other", [grpc_tensor(image)], headers=AUTH),
         grpc.StatusCode.NOT_FOUND, "unknown model 'other'"),
        (lambda: client.infer(NAME, [grpc_tensor([b"not an image"])], headers=AUTH),
         grpc.StatusCode.INVALID_ARGUMENT, "accepted formats"),
        (lambda: client.infer(NAME, [grpc_tensor(image * 33)], headers=AUTH),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-request-images"),
        (lambda: client.infer(NAME, [grpc_tensor(image)], headers=AUTH,
                              outputs=[triton_grpc.InferRequestedOutput("logits")]),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logits'"),
    ]
    wrong_type = triton_grpc.InferInput("images", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, np.float32))
    cases.append((lambda: client.infer(NAME, [wrong_type], headers=AUTH),
                  grpc.StatusCode.INVALID_ARGUMENT, "must be BYTES"))
    for call, code, message in cases:
        with pytest.raises(InferenceServerException) as error:
            call()
        assert error.value.status() == str(code), (code, error.value)
        assert message in error.value.message()
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'ocr_requests_total{endpoint="grpc_infer",status="401"}' in metrics
    assert 'ocr_requests_total{endpoint="grpc_infer",status="400"}' in metrics


def test_model_config_and_statistics_read_by_tritonclient(server):
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    config = http.get_model_config(NAME, headers=AUTH)
    assert config["max_batch_size"] == 32  # --max-request-images: the largest request batch
    assert config["dynamic_batching"]["preferred_batch_size"] == [8]  # --max-batch-size
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000
    assert [o["name"] for o in config["output"]] == ["texts", "confidences"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert grpc_client.get_model_config(NAME, headers=AUTH, as_json=True)["config"][
        "name"] == NAME
    assert "model_configuration" in http.get_server_metadata(headers=AUTH)["extensions"]

    def counts() -> tuple[dict, dict]:
        rest = http.get_inference_statistics(NAME, headers=AUTH)["model_stats"][0]
        over_grpc = grpc_client.get_inference_statistics(NAME, headers=AUTH, as_json=True)
        return rest, over_grpc["model_stats"][0]

    before, _ = counts()
    images = real_words(6)
    http.infer(NAME, [_http_tensor(images)], headers=auth())          # 6 images, one request
    grpc_client.infer(NAME, [grpc_tensor(images[:2])], headers=AUTH)  # 2 more
    with pytest.raises(InferenceServerException):
        grpc_client.infer(NAME, [grpc_tensor([b"junk"])], headers=AUTH)
    after, after_grpc = counts()
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - old["success"]["count"] == 2
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 8
    assert stats["queue"]["count"] - old["queue"]["count"] == 8
    assert stats["compute_infer"]["ns"] > old["compute_infer"]["ns"]
    executions = after["execution_count"] - before["execution_count"]
    assert 1 <= executions <= 8
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after[
        "execution_count"]
    assert int(after_grpc["inference_count"]) == after["inference_count"]
    every = httpx.get(server.url + "/v2/models/stats", headers=AUTH).json()
    assert every["model_stats"][0]["name"] == NAME
    assert httpx.get(server.url + f"/v2/models/{NAME}/stats").status_code == 401
    assert httpx.get(server.url + "/v2/models/other/config", headers=AUTH).status_code == 404


def _http_tensor(images: list[bytes]) -> triton_http.InferInput:
    tensor = triton_http.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_grpc_port_0_turns_it_off_and_a_busy_one_is_a_one_line_error(model):
    with ServerProcess(["--model", str(model), "--grpc-port", "0"]) as running:
        assert running.grpc_address is None
        assert "gRPC" not in running.tail(50)
        assert httpx.get(running.url + "/v2/health/ready").status_code == 200
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            http_port = free.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serve", "--model", str(model), "--port",
                               str(http_port), "--grpc-port", str(port)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "loaded" not in done.stderr
