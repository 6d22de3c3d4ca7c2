"""The int8 copies of PP-OCRv6's detector and recogniser: built into the weights cache by one
command each, taken by the pipeline's and the service's defaults once built (full images: the
detector's; word crops: the recogniser's), and served equal to offline. Runs on a weights
cache of its own (``$CRNN_WEIGHTS_DIR``)."""

from __future__ import annotations

import logging
import shutil

import httpx
import onnx
import pytest

from convert import quantize
from models import weights
from models.spec import quantization_of
from pipeline.ocr import open_pipeline, resolve_model
from preprocess.image import decode_rgb
from serve.process import ServerProcess
from tests.eval.test_det_rec import IC15_IMAGES
from tests.serve.test_ocr_service import photos


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A weights cache holding PP-OCRv6's fetched fp32 files and the classifier, no int8."""
    folder = tmp_path_factory.mktemp("weights")
    for name in ("ppocr-v6-det", "ppocr-v6-rec", "ppocr-cls"):
        shutil.copy(weights.fetch(name), folder)
    return folder


@pytest.fixture(scope="module")
def built(cache, tmp_path_factory):
    """The cache with both int8 copies built by ``python -m convert.quantize NAME``
    (calibrated on a few images, so quickly)."""
    from tests.conftest import render_line

    photos_dir = tmp_path_factory.mktemp("calibration_photos")
    if IC15_IMAGES.is_dir():
        for n in (2, 4):
            shutil.copy(IC15_IMAGES / f"img_{n}.jpg", photos_dir)
    else:
        from PIL import Image

        Image.fromarray(render_line(["OPEN", "DAILY"])[0]).save(photos_dir / "line.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CRNN_WEIGHTS_DIR", str(cache))
        assert quantize.main(["ppocr-v6-det", "--calibration", str(photos_dir),
                              "--target-agreement", "0", "--min-agreement", "0"]) == 0
        assert quantize.main(["ppocr-v6-rec", "--samples", "64",
                              "--min-agreement", "0"]) == 0
    return cache


def test_a_name_resolves_to_fp32_with_a_warning_until_its_int8_copy_is_built(
        cache, monkeypatch, caplog):
    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(cache))
    if weights.int8_path("ppocr-v6-rec").exists():
        pytest.skip("the int8 copy is already built in this module's cache")
    from pipeline import ocr

    ocr._WARNED_FP32.discard("ppocr-v6-rec")
    with caplog.at_level(logging.WARNING, logger="pipeline.ocr"):
        path, _ = resolve_model("ppocr-v6-rec")
    assert path == cache / "ppocr_v6_rec.onnx"
    assert "python -m convert.quantize ppocr-v6-rec" in caplog.text


def test_built_copies_are_the_defaults_and_fp32_stays_reachable(built, monkeypatch):
    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(built))
    for name in ("ppocr-v6-det", "ppocr-v6-rec"):
        int8 = weights.int8_path(name)
        assert resolve_model(name) == (int8, None) and int8.parent == built
        assert resolve_model(name, "fp32")[0] == weights.fetch(name)
    assert resolve_model("ppocr-cls")[0] == built / "ppocr_cls.onnx"  # no int8 copy
    # Each copy records how it was made: its model's recipe.
    for name in ("ppocr-v6-det", "ppocr-v6-rec"):
        recorded = quantization_of(onnx.load(str(weights.int8_path(name))))
        assert recorded["recipe"] == quantize.RECIPES[name].why


def test_served_equals_offline_with_the_int8_defaults(built, monkeypatch):
    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(built))
    images = photos()[:2]
    with open_pipeline(threads=1) as pipeline:
        # Full images: the int8 detector, the fp32 recogniser (FULL_IMAGE_INT8).
        assert pipeline.detector.runner.model_path == weights.int8_path("ppocr-v6-det")
        assert pipeline.recognizer.runner.model_path == weights.fetch("ppocr-v6-rec")
        offline = [[w.as_json() for w in pipeline([decode_rgb(raw)])[0].words]
                   for raw in images]
    assert any(offline)
    with ServerProcess(["--det", "--threads", "1", "--max-pixels", "2000000"],
                       ready_timeout=300) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        answers = [client.post("/ocr", content=raw) for raw in images]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["words"] for a in answers] == offline


def test_the_recogniser_service_serves_the_int8_recogniser(built, monkeypatch):
    """Without --det the service reads word crops: the recogniser's int8 copy, whose budget
    is its IIIT5K accuracy, is the default there; its answers equal the offline recogniser's
    on the same file."""
    from infer import open_model
    from pipeline import Recognition, Recognizer
    from tests.conftest import encode, word_image

    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(built))
    int8 = weights.int8_path("ppocr-v6-rec")
    crops = [encode(word_image(text, 140, 40, "RGB")) for text in ("OPEN", "Daily", "2026")]
    runner, spec = open_model(int8)
    with Recognizer(runner, spec) as recognizer:
        offline = [r.text for r in recognizer(crops) if isinstance(r, Recognition)]
    assert len(offline) == 3
    with ServerProcess(["--threads", "1"], ready_timeout=300) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        answers = [client.post("/service", content=raw) for raw in crops]
        log = server.tail(40)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["text"] for a in answers] == offline
    assert f"loaded from {int8}" in log
