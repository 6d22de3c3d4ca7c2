"""The HTTP service as a real process on 127.0.0.1, with real clients (httpx, tritonclient).

The model is the real nano-ocr export; the images are real IIIT5K words where the data is
present (else rendered words).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from convert import quantize
from infer import open_model
from pipeline import Recognition, Recognizer
from preprocess.lmdb_reader import open_lmdb, read_sample
from serve.process import ServerProcess
from serve.service import ServeConfig, Service
from tests.conftest import IIIT5K, encode, word_image

TOKEN = "s3cret-token"


def real_words(count: int) -> list[bytes]:
    """``count`` encoded word images: IIIT5K test images, or rendered words without it."""
    if not IIIT5K.is_dir():
        words = ["hello", "world", "CRNN", "serve", "batch", "width", "token", "Ascend"]
        return [encode(word_image(words[i % len(words)] * (1 + i % 3), 60 + 17 * i, 32))
                for i in range(count)]
    env = open_lmdb(IIIT5K)
    with env.begin() as txn:
        images = [read_sample(txn, index).image for index in range(1, count + 1)]
    env.close()
    return images


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported["nano-ocr"]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token.txt"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server(model, token_file):
    """The service with a token, a 300 kB body cap and a 4 MP pixel cap."""
    with ServerProcess(["--model", str(model), "--name", "crnn", "--token-file",
                        str(token_file), "--max-body-bytes", "300000", "--max-pixels",
                        "4000000"]) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http


def metric(client: httpx.Client, sample: str) -> float:
    """The value of one sample of the server's /metrics (0 when it is absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_metric(client: httpx.Client, sample: str, value: float,
                    seconds: float = 10.0) -> float:
    """Poll ``sample`` until it reaches ``value`` or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while (current := metric(client, sample)) < value and time.monotonic() < deadline:
        time.sleep(0.02)
    return current


def offline_batch_1(model: Path, images: list[bytes]) -> list[Recognition]:
    runner, spec = open_model(model)
    with Recognizer(runner, spec, batch_size=1) as recognizer:
        return [recognizer([image])[0] for image in images]


def test_answers_equal_the_offline_batch_1_path_under_load(server, client, model):
    images = real_words(64)
    expected = offline_batch_1(model, images)

    def post(image: bytes) -> dict:
        answer = client.post("/service", content=image)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ThreadPoolExecutor(16) as pool:  # 16 in flight: the batcher forms real batches
        served = list(pool.map(post, images))
    assert [s["text"] for s in served] == [e.text for e in expected]
    np.testing.assert_allclose([s["confidence"] for s in served],
                               [e.confidence for e in expected], rtol=1e-4)
    metrics = client.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("ocr_batch_size_sum")]
    count = [line for line in metrics.splitlines() if line.startswith("ocr_batch_size_count")]
    assert float(sizes[0].split()[-1]) > float(count[0].split()[-1])  # some batch held > 1


def test_kserve_v2_with_tritonclient(server, model):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    images = real_words(5)
    expected = [r.text for r in offline_batch_1(model, images)]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("crnn", headers=headers)
    metadata = client.get_model_metadata("crnn", headers=headers)
    assert [t["name"] for t in metadata["outputs"]] == ["texts", "confidences"]
    assert metadata["platform"] == "onnxruntime_onnx"

    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    result = client.infer("crnn", [tensor], headers=headers)  # binary outputs by default
    assert [t.decode() for t in result.as_numpy("texts")] == expected
    assert result.as_numpy("confidences").dtype == np.float32
    assert result.as_numpy("confidences").shape == (len(images),)

    result = client.infer("crnn", [tensor], headers=headers, request_id="r7",
                          outputs=[triton.InferRequestedOutput("texts", binary_data=False)])
    assert list(result.as_numpy("texts")) == expected
    assert result.get_response()["id"] == "r7"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["texts"]

    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.infer("other", [tensor], headers=headers)
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer("crnn", [tensor])


def test_kserve_v2_json_body_with_base64(client, model):
    images = real_words(2)
    expected = [r.text for r in offline_batch_1(model, images)]
    body = {"id": "a", "inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",
                                   "data": [base64.b64encode(i).decode() for i in images]}]}
    answer = client.post("/v2/models/crnn/infer", json=body)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["texts"]["data"] == expected
    assert outputs["confidences"]["datatype"] == "FP32"
    assert client.post("/v2/models/crnn/versions/1/infer", json=body).status_code == 200
    assert client.post("/v2/models/crnn/versions/2/infer", json=body).status_code == 404


def test_a_request_of_more_images_than_the_per_request_bound_is_413(client):
    """65 images in one v2 request (the bound is 64 by default): 413 naming the bound, so
    one client's batch cannot fill the queue; 64 go through."""
    word = base64.b64encode(encode(word_image("ab", 40, 32))).decode()  # small: the 300 kB cap

    def body(count: int) -> dict:
        return {"inputs": [{"name": "images", "shape": [count], "datatype": "BYTES",
                            "data": [word] * count}]}

    answer = client.post("/v2/models/crnn/infer", json=body(65))
    assert answer.status_code == 413
    assert "65 images in one request; a request holds at most 64 (--max-request-images)" in \
        answer.json()["error"]
    answer = client.post("/v2/models/crnn/infer", json=body(64))
    assert answer.status_code == 200
    assert len(set(answer.json()["outputs"][0]["data"])) == 1


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (json.dumps({"inputs": []}).encode(), "non-empty list"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                             "data": ["aGk="]}]}).encode(), "unknown input 'x'"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32",
                             "data": [1.0]}]}).encode(), "must be BYTES"),
    (json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                             "data": ["aGk="]}]}).encode(), "shape says 2"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "data": ["not base64!"]}]}).encode(), "not base64"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "data": ["aGk="]}], "outputs": [{"name": "logits"}]}).encode(),
     "unknown output 'logits'"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "data": ["aGk="]}], "outputs": [{"name": ["texts"]}]}).encode(),
     "unknown output ['texts']"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "data": ["aGk="]}], "parameters": {"binary_data_output": "yes"}}
                ).encode(), "must be true or false"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "parameters": {"binary_data_size": True}}]}).encode(),
     "binary_data_size must be a count of bytes"),
    (json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                             "data": ["aGk="], "parameters": [1]}]}).encode(),
     "'parameters' must be a JSON object"),
    (b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested too deeply"),
    (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": '
     + b"[" * 900 + b'"aGk="' + b"]" * 900 + b"}]}", "not a decodable image"),
])
def test_kserve_v2_malformed_requests_are_400(client, body, message):
    answer = client.post("/v2/models/crnn/infer", content=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_kserve_v2_binary_sizes_that_do_not_add_up_are_400(client):
    header = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 50}}]}).encode()
    answer = client.post("/v2/models/crnn/infer", content=header + b"\x05\x00\x00\x00abc",
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 400
    assert "runs past" in answer.json()["error"]
    answer = client.post("/v2/models/crnn/infer", content=header,
                         headers={"Inference-Header-Content-Length": "99999"})
    assert answer.status_code == 400


def test_an_image_that_fails_in_a_v2_batch_names_its_index(client):
    good = real_words(1)[0]
    body = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                        "data": [base64.b64encode(good).decode(),
                                 base64.b64encode(b"plain text").decode()]}]}
    answer = client.post("/v2/models/crnn/infer", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("image 1: not a decodable image")


def test_bad_input_gets_a_clear_status_and_reason(client):
    answer = client.post("/service", content=b"")
    assert answer.status_code == 400 and "empty" in answer.json()["error"]

    answer = client.post("/service", content=b"GIF89a but not really an image")
    assert answer.status_code == 400
    assert "not a decodable image" in answer.json()["error"]
    assert "accepted formats: PNG" in answer.json()["error"]

    tga = encode(word_image("tga"), "TGA")  # Pillow writes TGA; the service does not read it
    answer = client.post("/service", content=tga)
    assert answer.status_code == 400 and "not a decodable image" in answer.json()["error"]

    answer = client.post("/service", content=b"\0" * 300_001)
    assert answer.status_code == 413 and "--max-body-bytes" in answer.json()["error"]

    def chunks():  # no Content-Length: the cap holds while the body streams in
        for _ in range(40):
            yield b"\0" * 10_000

    answer = client.post("/service", content=chunks())
    assert answer.status_code == 413

    huge = encode(Image.new("L", (2500, 2000), 255))  # 5 MP, a few kB of PNG
    answer = client.post("/service", content=huge)
    assert answer.status_code == 413 and "over the cap of 4000000" in answer.json()["error"]

    # Pillow's decompression-bomb guard: a PNG header declaring 20000 x 20000 pixels.
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")
    answer = client.post("/service", content=bomb.getvalue())
    assert answer.status_code == 413

    # The worker survived all of that.
    assert client.post("/service", content=real_words(1)[0]).status_code == 200


def test_a_client_leaving_mid_body_is_counted_not_a_traceback(server, client):
    import socket

    port = int(server.url.rsplit(":", 1)[1])
    bad_requests = 'ocr_requests_total{endpoint="service",status="400"}'
    before = metric(client, bad_requests)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\nonly part")
    assert wait_for_metric(client, bad_requests, before + 1) == before + 1
    assert "Traceback" not in server.log.read_text()
    assert client.post("/service", content=real_words(1)[0]).status_code == 200


def test_token_is_required_except_for_health(server):
    image = real_words(1)[0]
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        answer = anonymous.post("/service", content=image)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = anonymous.post("/service", content=image,
                               headers={"Authorization": "Bearer s3cret-tokem"})
        assert wrong.status_code == 401
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/v2/models/crnn").status_code == 401
        assert anonymous.get("/v2/health/live").status_code == 200
        assert anonymous.get("/v2/health/ready").status_code == 200
        right = anonymous.post("/service", content=image,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200


def test_metrics_are_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    assert client.post("/service", content=real_words(1)[0]).status_code == 200
    client.post("/service", content=b"")
    answer = client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    for name in ("ocr_requests", "ocr_request_seconds", "ocr_batch_size", "ocr_engine_seconds",
                 "ocr_queue_depth", "ocr_expired"):
        assert name in families, name
    statuses = {s.labels["status"] for s in families["ocr_requests"].samples
                if s.labels.get("endpoint") == "service"}
    assert {"200", "400"} <= statuses
    engine = [s.value for s in families["ocr_engine_seconds"].samples
              if s.name == "ocr_engine_seconds_sum"]
    assert engine[0] > 0


def test_queue_full_is_503_and_deadline_is_504(model):
    """Requests sit in their bucket (1.5 s wait, batches of 64) past their 0.8 s deadline."""
    image = real_words(1)[0]
    with ServerProcess(["--model", str(model), "--max-wait-ms", "1500", "--max-batch-size",
                        "64", "--max-queue", "3", "--timeout-ms", "800"]) as running, \
            httpx.Client(base_url=running.url, timeout=30) as client, \
            ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(client.post, "/service", content=image) for _ in range(3)]
        wait_for_metric(client, "ocr_queue_depth", 3, seconds=5)
        full = client.post("/service", content=image)
        assert full.status_code == 503
        assert full.headers["Retry-After"] == "1"
        assert "queue is full" in full.json()["error"]
        for future in waiting:
            answer = future.result()
            assert answer.status_code == 504, answer.text
            assert "deadline" in answer.json()["error"]
        # The expired requests never reach the engine, and the server goes on serving.
        time.sleep(1.0)
        metrics = client.get("/metrics").text
        assert 'ocr_requests_total{endpoint="service",status="504"} 3.0' in metrics
        assert client.get("/v2/health/ready").status_code == 200


def test_sigterm_drains_queued_requests_then_exits(model):
    image = real_words(1)[0]
    running = ServerProcess(["--model", str(model), "--max-wait-ms", "1500",
                             "--max-batch-size", "64", "--drain-seconds", "3"])
    with running, httpx.Client(base_url=running.url, timeout=30) as client, \
            ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(client.post, "/service", content=image) for _ in range(4)]
        wait_for_metric(client, "ocr_queue_depth", 4, seconds=5)
        running.terminate()
        deadline = time.monotonic() + 2.5  # inside the 3 s drain the listener stays open
        ready = client.get("/v2/health/ready")
        while ready.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "shutting down" in ready.json()["error"]
        answers = [future.result() for future in queued]
        assert [a.status_code for a in answers] == [200] * 4
        assert len({a.json()["text"] for a in answers}) == 1
        assert running.process.wait(30) == 0


def test_readiness_is_503_until_loaded(model):
    """In process: the app answers 503 (with Retry-After on requests) before the model loads."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.service import ServeConfig, Service

    service = Service(ServeConfig(model=model, name="m"))
    with TestClient(create_app(service)) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        answer = client.post("/service", content=real_words(1)[0])
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        service.load()
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/service", content=real_words(1)[0]).status_code == 200


def test_a_model_that_cannot_load_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    from common.cli import REPO_ROOT

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    done = subprocess.run([sys.executable, "-m", "serve", "--model", str(bad), "--port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "broken.onnx" in done.stderr.strip().splitlines()[-1]
    missing = subprocess.run([sys.executable, "-m", "serve", "--model", str(tmp_path / "no.onnx"),
                              "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and "no.onnx" in missing.stderr


def test_client_threads_do_not_leak_into_results(server, client):
    """Two kinds of image at once: each answer belongs to its own request."""
    first, second = real_words(2)
    expected = {first: client.post("/service", content=first).json()["text"],
                second: client.post("/service", content=second).json()["text"]}
    assert expected[first] != expected[second]
    barrier = threading.Barrier(8)

    def post(image: bytes) -> tuple[bytes, str]:
        barrier.wait()
        return image, client.post("/service", content=image).json()["text"]

    with ThreadPoolExecutor(8) as pool:
        for image, text in pool.map(post, [first, second] * 4):
            assert text == expected[image]


def test_a_busy_port_is_a_one_line_error_before_the_model_loads(model):
    import socket
    import subprocess
    import sys

    from common.cli import REPO_ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serve", "--model", str(model), "--port",
                               str(port)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "loaded" not in done.stderr


def test_a_model_with_a_dynamically_quantised_lstm_is_flagged(tmp_path, tiny_lmdb, fixed_models,
                                                             caplog):
    """convert.quantize --lstm int8 takes the LSTM's scales from each batch: a batching service
    says so at start-up (an answer would depend on the requests beside it)."""
    int8_lstm = tmp_path / "int8_lstm.onnx"
    assert quantize.main([str(fixed_models["nano-ocr"]), str(int8_lstm), "--calibration",
                          str(tiny_lmdb), "--lstm", "int8", "--min-agreement", "0.9"]) == 0
    with caplog.at_level(logging.WARNING, logger="serve.service"):
        Service(ServeConfig(model=int8_lstm, name="crnn")).close()
    assert "quantised dynamically" in caplog.text and str(int8_lstm) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve.service"):
        Service(ServeConfig(model=int8_lstm, name="crnn", max_batch_size=1)).close()
        Service(ServeConfig(model=fixed_models["nano-ocr"], name="crnn")).close()
    assert "quantised dynamically" not in caplog.text


def test_a_token_that_http_cannot_carry_is_refused_at_start(tmp_path, model):
    import subprocess
    import sys

    from common.cli import REPO_ROOT

    token = tmp_path / "token.txt"
    token.write_text("s3cret-tök\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "serve", "--model", str(model), "--port", "0",
                           "--token-file", str(token)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last.startswith("error: --token-file ") and "'ö'" in last and "ASCII" in last


def test_ctrl_c_while_waiting_for_the_server_leaves_no_server_behind(model, monkeypatch):
    """KeyboardInterrupt raised where ``wait_until_ready`` polls (a bench's Ctrl-C)."""
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ServerProcess, "wait_until_ready", interrupted)
    running = ServerProcess(["--model", str(model)])
    with pytest.raises(KeyboardInterrupt):
        running.__enter__()
    assert running.process.poll() is not None  # stopped, not left listening
