"""Detector descriptions: the resize rules, validation, and the fetched detector's metadata."""

from __future__ import annotations

import onnx
import pytest

from common.errors import ToolchainError
from models import weights
from models.backends import describe
from models.det_spec import DetectorSpec, description_from_dict
from models.spec import ModelSpec

SPEC = DetectorSpec(arch="ppocr-v4-det")


def test_resize_rules():
    # PaddleOCR's "max": the longer side down to 960, both sides to multiples of 32.
    assert SPEC.input_size(1280, 720) == (960, 544)
    assert SPEC.input_size(640, 480) == (640, 480)  # never enlarged
    assert SPEC.input_size(10, 5) == (32, 32)  # at least one stride
    # RapidOCR's "min": the shorter side up to 736.
    rapid = SPEC.replace(limit_type="min", limit_side_len=736)
    assert rapid.input_size(1280, 720) == (1312, 736)
    assert rapid.input_size(2000, 1500) == (2016, 1504)  # never shrunk
    assert SPEC.output_shape_of((2, 3, 544, 960)) == (2, 1, 544, 960)
    with pytest.raises(ToolchainError, match="no area"):
        SPEC.input_size(0, 10)


@pytest.mark.parametrize("changes, message", [
    ({"limit_type": "mid"}, "limit type"),
    ({"mean": (0.5, 0.5)}, "one value per channel"),
    ({"min_side": 48}, "multiple of the stride"),
    ({"thresh": 1.5}, "0 < thresh < 1"),
    ({"channel_order": "grey"}, "'rgb' or 'bgr'"),
])
def test_invalid_descriptions(changes, message):
    with pytest.raises(ToolchainError, match=message):
        SPEC.replace(**changes)


def test_round_trip_and_dispatch():
    data = SPEC.to_dict()
    assert description_from_dict(data, "x") == SPEC
    assert isinstance(description_from_dict({"arch": "crnn", "alphabet": "ab"}, "x"), ModelSpec)
    with pytest.raises(ToolchainError, match="sidecar: limit type"):
        description_from_dict({**data, "limit_type": "?"}, "sidecar")


def test_fetched_detector_carries_its_description(ppocr_det_path):
    assert ppocr_det_path == weights.weights_path("ppocr-v4-det")
    assert weights.sha256_of(ppocr_det_path) != weights._source("ppocr-v4-det").sha256  # a copy
    spec = describe(ppocr_det_path)
    assert spec == SPEC
    model = onnx.load(str(ppocr_det_path), load_external_data=False)
    assert [i.name for i in model.graph.input] == [spec.input_name]
    assert [o.name for o in model.graph.output] == [spec.output_name]
