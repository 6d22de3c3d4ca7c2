"""The whole-image endpoints (/ocr, /ocr/prediction) of a real server process with a real
detector and recogniser, against the offline pipeline on the same images."""

from __future__ import annotations

import ast
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.ocr import open_pipeline
from preprocess.image import decode_rgb
from preprocess.image_folder import list_images
from serve.process import ServerProcess
from tests.conftest import encode, render_line
from tests.eval.test_det_rec import IC15_IMAGES


def photos() -> list[bytes]:
    """Three real ICDAR 2015 photos where the data is present, else rendered lines; and the
    first turned upside down (the direction classifier's work)."""
    found = _photos()
    turned = np.ascontiguousarray(decode_rgb(found[0])[::-1, ::-1])
    return [*found, encode(Image.fromarray(turned), "PNG")]


def _photos() -> list[bytes]:
    if IC15_IMAGES.is_dir():
        return [p.read_bytes() for p in list_images(IC15_IMAGES)[:3]]
    lines = [render_line(w)[0] for w in (["OPEN", "DAILY"], ["EXIT", "2026"], ["SALE"])]
    canvas = [np.full((360, 640, 3), 255, np.uint8) for _ in lines]
    for image, line in zip(canvas, lines):
        image[100:100 + line.shape[0], 40:40 + line.shape[1]] = line
    return [encode(Image.fromarray(c), "JPEG", quality=95) for c in canvas]


@pytest.fixture(scope="module")
def server(ppocr_det_path, ppocr_rec_path):
    with ServerProcess(["--model", str(ppocr_rec_path), "--det", str(ppocr_det_path),
                        "--max-pixels", "2000000", "--threads", "1"]) as running:
        yield running


@pytest.fixture(scope="module")
def offline(ppocr_det_path, ppocr_rec_path):
    """The offline pipeline's words for each photo (the same models and settings)."""
    with open_pipeline(ppocr_det_path, ppocr_rec_path, threads=1) as pipeline:
        return [[w.as_json() for w in pipeline([decode_rgb(raw)])[0].words] for raw in photos()]


def test_ocr_equals_the_offline_pipeline_under_concurrency(server, offline):
    images = photos()
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda raw: client.post("/ocr", content=raw), images * 2))
    for index, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["words"] == offline[index % len(images)]
    assert any(offline)  # the photos hold text
    upright, turned = ({w["text"] for w in offline[i]} for i in (0, -1))
    assert len(upright & turned) >= len(upright) // 2  # the classifier turned them back


def test_paddle_serving_pipeline_format(server, offline):
    raw = photos()[0]
    payload = {"key": ["image"], "value": [base64.b64encode(raw).decode("utf8")]}
    # As Paddle Serving's pipeline_http_client.py sends it: a JSON string as the body.
    answer = httpx.post(server.url + "/ocr/prediction", content=json.dumps(payload), timeout=60)
    result = answer.json()
    assert answer.status_code == 200 and result["err_no"] == 0 and result["err_msg"] == ""
    items = ast.literal_eval(result["value"][0])  # the client eval()s it
    assert [[text, points] for text, points in items] == [
        [w["text"], w["points"]] for w in offline[0]]


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "not JSON"),
    (b'{"key": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    (json.dumps({"key": ["img"], "value": ["AAAA"]}).encode(), 400, 'no "image"'),
    (json.dumps({"key": ["image"], "value": ["@@@"]}).encode(), 400, "not base64"),
    (json.dumps({"key": ["image"], "value": [base64.b64encode(b"junk").decode()]}).encode(),
     400, "not a decodable image"),
])
def test_bad_pipeline_requests(server, body, status, message):
    answer = httpx.post(server.url + "/ocr/prediction", content=body, timeout=30)
    assert answer.status_code == status
    assert answer.json()["err_no"] == status and message in answer.json()["err_msg"]


def test_empty_bodies_and_wrong_methods_answer_in_our_error_form(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/ocr/prediction", content=b"")
        assert answer.status_code == 400 and '"key": ["image"]' in answer.json()["err_msg"]
        answer = client.get("/ocr")
        assert answer.status_code == 405 and answer.json()["error"].startswith("GET /ocr: ")
        answer = client.post("/no/such/path", content=b"x")
        assert answer.status_code == 404 and "/no/such/path" in answer.json()["error"]


def test_bad_and_blank_images(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        blank = encode(Image.new("RGB", (320, 240), "white"), "PNG")
        answer = client.post("/ocr", content=blank)
        assert answer.status_code == 200 and answer.json()["words"] == []
        huge = encode(Image.new("L", (2000, 1100)), "PNG")  # 2.2 MP over the 2 MP cap
        answer = client.post("/ocr", content=huge)
        assert answer.status_code == 413 and "over the cap" in answer.json()["error"]
        assert client.post("/ocr", content=b"").status_code == 400


def test_more_regions_than_the_queue_holds_is_413_not_a_retry(ppocr_det_path, ppocr_rec_path):
    canvas = np.full((480, 640, 3), 255, np.uint8)
    for row, word in enumerate(["OPEN", "EXIT", "SALE", "2026"]):  # four separate regions
        line = render_line([word])[0]
        canvas[20 + 110 * row:20 + 110 * row + line.shape[0], 40:40 + line.shape[1]] = line
    with ServerProcess(["--model", str(ppocr_rec_path), "--det", str(ppocr_det_path),
                        "--max-queue", "2", "--threads", "1"]) as running:
        answer = httpx.post(running.url + "/ocr", content=encode(Image.fromarray(canvas)),
                            timeout=60)
    assert answer.status_code == 413, answer.text
    assert "4 text regions" in answer.json()["error"] and "--max-queue" in answer.json()["error"]
    assert "retry-after" not in answer.headers


def test_ocr_without_a_detector_is_404(exported):
    with ServerProcess(["--model", str(exported["nano-ocr"])]) as running:
        answer = httpx.post(running.url + "/ocr", content=b"x", timeout=30)
    assert answer.status_code == 404 and "--det" in answer.json()["error"]


def test_the_pipeline_flags_reach_the_service_and_share_the_image_cap_with_det_rec():
    from eval.det_rec import _parser as det_rec_parser
    from preprocess.image import DEFAULT_MAX_PIXELS
    from serve.__main__ import build_parser, config_of

    config = config_of(build_parser().parse_args(
        ["--model", "rec.onnx", "--det", "det.onnx", "--no-split-words",
         "--min-confidence", "0.8"]))
    assert config.split_words is False and config.min_confidence == 0.8
    default = config_of(build_parser().parse_args(["--model", "rec.onnx"]))
    assert default.split_words is True and default.min_confidence == 0.5
    det_rec = det_rec_parser().parse_args(["--images", "photos", "--predictions", "p.json"])
    assert default.max_pixels == det_rec.max_pixels == DEFAULT_MAX_PIXELS
