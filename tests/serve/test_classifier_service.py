"""An image classifier behind the service, as a real process on 127.0.0.1 with real clients:
any single-input ONNX classifier given a label file (a tiny torch classifier exported here),
and PaddleOCR's text-direction classifier; served answers equal the offline classifier's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from common.errors import ToolchainError
from infer import open_model
from models import weights
from models.cls_spec import ClassifierSpec
from models.describe import describe_classifier
from pipeline.classifier import Classifier
from preprocess.image import decode_rgb
from serve.process import ServerProcess
from tests.conftest import CLASSIFIER_LABELS as LABELS
from tests.conftest import encode, render_line

TOP_K = 2


def pictures(count: int) -> list[bytes]:
    """Encoded images of several sizes and aspect ratios (two input sizes for ppocr-cls)."""
    rng = np.random.default_rng(3)
    return [encode(Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 40 + 23 * i, 3),
                                                np.uint8)))
            for i in range(count)]


def offline(path, spec, images: list[bytes]) -> list[list[tuple[str, float]]]:
    runner, _ = open_model(path, expect=ClassifierSpec, fallback=spec, threads=1)
    with Classifier(runner, spec, batch_size=1) as classifier:
        return [classifier([decode_rgb(raw)])[0].top(TOP_K) for raw in images]


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tiny, labels_file):
    with ServerProcess(["--model", str(tiny[0]), "--labels", str(labels_file), "--top-k",
                        str(TOP_K), "--threads", "1", "--name", "pets"]) as running:
        yield running


def test_curl_gets_the_top_labels_best_first_equal_to_offline(server, tiny):
    images = pictures(8)
    expected = offline(tiny[0], describe_classifier(tiny[0], LABELS), images)
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda raw: client.post("/service", content=raw), images))
    for answer, want in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        got = answer.json()["labels"]
        assert [g["label"] for g in got] == [label for label, _ in want]
        np.testing.assert_allclose([g["probability"] for g in got], [p for _, p in want],
                                   atol=1e-5)
        assert got[0]["probability"] >= got[1]["probability"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="service",status="200"' in metrics


def test_kserve_v2_with_tritonclient(server, tiny):
    import tritonclient.http as triton

    images = pictures(5)
    expected = offline(tiny[0], describe_classifier(tiny[0], LABELS), images)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    metadata = client.get_model_metadata("pets")
    assert [(t["name"], t["shape"]) for t in metadata["outputs"]] == [
        ("labels", [-1, TOP_K]), ("probabilities", [-1, TOP_K])]
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    result = client.infer("pets", [tensor])
    labels = result.as_numpy("labels")
    assert labels.shape == (len(images), TOP_K)
    assert [[x.decode() for x in row] for row in labels] == [[label for label, _ in w]
                                                              for w in expected]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, [[p for _, p in w] for w in expected], atol=1e-5)
    json_result = client.infer("pets", [tensor], outputs=[
        triton.InferRequestedOutput("labels", binary_data=False)])
    assert [o["name"] for o in json_result.get_response()["outputs"]] == ["labels"]


def test_bad_requests_are_one_line(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/service", content=b"not an image")
        assert answer.status_code == 400 and "error" in answer.json()
        answer = client.post("/ocr", content=pictures(1)[0])
        assert answer.status_code == 404 and "--det" in answer.json()["error"]


def test_the_ppocr_direction_classifier_as_a_service():
    path = weights.fetch("ppocr-cls")
    lines = [render_line(words)[0] for words in (["OPEN", "DAILY"], ["EXIT", "2026"])]
    images = [encode(Image.fromarray(np.ascontiguousarray(p))) for line in lines
              for p in (line, line[::-1, ::-1])]
    runner, spec = open_model(path, expect=ClassifierSpec, threads=1)
    with Classifier(runner, spec, batch_size=1) as classifier:
        expected = [classifier([decode_rgb(raw)])[0].top(TOP_K) for raw in images]
    with ServerProcess(["--model", "ppocr-cls", "--threads", "1"]) as running, \
            httpx.Client(base_url=running.url, timeout=60) as client:
        got = [client.post("/service", content=raw).json()["labels"] for raw in images]
    assert [[g["label"] for g in row] for row in got] == [[label for label, _ in w]
                                                          for w in expected]
    assert [row[0]["label"] for row in got] == ["0", "180", "0", "180"]


def test_labels_that_do_not_fit_the_model_stop_the_start(tiny, tmp_path):
    labels = tmp_path / "two.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ToolchainError, match=r"\[N, 2\] for the 2 labels"), \
            ServerProcess(["--model", str(tiny[0]), "--labels", str(labels)], ready_timeout=60):
        pass
