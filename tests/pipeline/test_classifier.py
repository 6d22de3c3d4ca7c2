"""Image classifiers: the description, a tiny torch classifier exported to ONNX and described
from its graph, PaddleOCR's direction classifier's preprocessing, the 180-degree turn of a
crop in the full-image pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.errors import ToolchainError
from infer import open_model
from models import weights
from models.backends import describe
from models.cls_spec import ClassifierSpec, read_labels
from models.db_postprocess import TextBox
from models.describe import describe_classifier
from models.det_spec import description_from_dict
from models.sidecar import InputPlan, ShapePlan, read_sidecar, write_sidecar
from pipeline.classifier import Classifier, classifier_input, upside_down
from pipeline.ocr import CLS_THRESHOLD, cut_crops, direction_readings, settle_directions
from pipeline.recognizer import Failure, Recognition
from tests.conftest import CLASSIFIER_LABELS as LABELS
from tests.conftest import render_line


@pytest.fixture(scope="module")
def ppocr_cls() -> Path:
    return weights.fetch("ppocr-cls")


def test_a_graph_from_elsewhere_is_described_by_its_shapes_and_the_labels(tiny):
    path, _ = tiny
    spec = describe_classifier(path, LABELS)
    assert (spec.input_name, spec.output_name) == ("pixels", "scores")
    assert (spec.height, spec.width, spec.channel_order, spec.resize) == (24, 32, "rgb",
                                                                          "stretch")
    assert spec.output_kind == "logits" and spec.labels == LABELS
    with pytest.raises(ToolchainError, match=r"2 labels for .*\[N, 3\]|shape"):
        describe_classifier(path, ("a", "b"))


def test_the_classifier_equals_torch_on_real_pixels(tiny):
    path, model = tiny
    spec = describe_classifier(path, LABELS)
    runner, _ = open_model(path, expect=ClassifierSpec, fallback=spec, threads=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 7 * i, 50 + 11 * i, 3), np.uint8) for i in range(5)]
    with Classifier(runner, spec, batch_size=2) as classifier:
        results = classifier(images)
    inputs = torch.from_numpy(np.stack([classifier_input(i, spec) for i in images]))
    expected = torch.softmax(model(inputs), dim=1).detach().numpy()
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), expected,
                               atol=1e-5)
    assert [r.label for r in results] == [LABELS[i] for i in expected.argmax(1)]
    top = results[0].top(2)
    assert [label for label, _ in top] == [LABELS[i] for i in np.argsort(-expected[0])[:2]]
    assert top[0][1] >= top[1][1]


def test_the_input_is_the_normalised_image_on_the_grid(tiny):
    """stretch: the whole input; ImageNet normalisation in RGB order."""
    spec = describe_classifier(tiny[0], LABELS)
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 0] = 255
    array = classifier_input(rgb, spec)
    assert array.shape == (3, 24, 32) and array.dtype == np.float32
    np.testing.assert_allclose(array[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224,
                                                -0.406 / 0.225], rtol=1e-6)


def test_ppocr_cls_pads_on_the_right_keeping_the_ratio(ppocr_cls):
    """PaddleOCR predict_cls.resize_norm_img: height 48, width ceil(48 * w / h) (at most
    192), BGR, (x/255 - 0.5)/0.5, zeros on the right."""
    spec = describe(ppocr_cls)
    assert isinstance(spec, ClassifierSpec) and spec.labels == ("0", "180")
    rgb = np.zeros((20, 41, 3), np.uint8)
    rgb[..., 2] = 255  # blue, first in BGR
    array = classifier_input(rgb, spec)
    assert array.shape == (3, 48, 192)
    width = int(np.ceil(48 * 41 / 20))  # 99
    np.testing.assert_allclose(array[:, :, :width].mean(axis=(1, 2)), [1, -1, -1], atol=1e-6)
    assert not array[:, :, width:].any()
    assert spec.resized_width(1000, 10) == 192


def test_ppocr_cls_reads_upright_and_upside_down_lines(ppocr_cls):
    runner, spec = open_model(ppocr_cls, expect=ClassifierSpec, threads=1)
    lines = [render_line(words)[0] for words in (["OPEN", "DAILY"], ["EXIT", "2026"],
                                                 ["Free", "parking"])]
    with Classifier(runner, spec) as classifier:
        upright = classifier(lines)
        turned = classifier([np.ascontiguousarray(line[::-1, ::-1]) for line in lines])
    assert [r.label for r in upright] == ["0"] * 3
    assert [r.label for r in turned] == ["180"] * 3
    assert sum(upside_down(r, CLS_THRESHOLD) for r in turned) >= 2


def test_a_crop_turned_upside_down_keeps_its_words_on_the_image():
    """The turned crop's transform maps its pixels back onto the same image points."""
    image = np.zeros((80, 200, 3), np.uint8)
    image[20:40, 30:150] = np.arange(120, dtype=np.uint8)[None, :, None]
    points = np.array([[30, 20], [150, 20], [150, 40], [30, 40]], np.float32)
    (crop,) = cut_crops(image, [TextBox(points, 0.9)], 1.5)
    turned = crop.turned_upside_down()
    np.testing.assert_array_equal(turned.pixels, crop.pixels[::-1, ::-1])
    assert turned.flipped and turned.turned_upside_down().flipped is False
    # The crop's top-left (0, 0) is the image's bottom-right corner of the box.
    corner = turned.matrix @ np.array([150, 40, 1.0])
    np.testing.assert_allclose(corner[:2] / corner[2], [0, 0], atol=1e-3)
    np.testing.assert_allclose(turned.box.points[0], [150, 40])


def test_the_classifier_description_round_trips(tmp_path, ppocr_cls):
    spec = describe(ppocr_cls)
    assert description_from_dict(json.loads(json.dumps(spec.to_dict())), "x") == spec
    plan = ShapePlan("range", (InputPlan("x", ((1, 16), 3, 48, 192)),))
    write_sidecar(tmp_path / "cls.om", plan, spec, "Ascend310P3", ["atc"], ppocr_cls)
    assert read_sidecar(tmp_path / "cls.om")[1] == spec
    assert onnx.load(str(ppocr_cls), load_external_data=False).graph.output[0].name == \
        spec.output_name


@pytest.mark.parametrize("text, message", [
    ("", "no labels"), ("a\n\nb\n", ":2: blank label"), ("a\nb\na\n", "'a' appears twice"),
])
def test_bad_label_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ToolchainError, match=message):
        read_labels(path)
    path.write_text("a\nb\n\n")
    assert read_labels(path) == ("a", "b")
    with pytest.raises(ToolchainError, match="2 labels for a classifier of 3"):
        read_labels(path, expected=3)


def test_an_inconsistent_description_is_refused():
    with pytest.raises(ToolchainError, match="at least 2 labels"):
        ClassifierSpec(arch="x", labels=("only",)).validate()
    with pytest.raises(ToolchainError, match="one value per channel"):
        ClassifierSpec(arch="x", labels=("a", "b"), channel_order="grey").validate()



def test_a_crop_read_both_ways_keeps_the_more_confident_reading():
    image = np.zeros((60, 200, 3), np.uint8)
    boxes = [TextBox(np.array([[10, 10], [90, 10], [90, 30], [10, 30]], np.float32), 0.9),
             TextBox(np.array([[100, 10], [190, 10], [190, 30], [100, 30]], np.float32), 0.9)]
    crops = cut_crops(image, boxes, 1.5)
    readings = direction_readings(crops, {0, 1}, verify=True)
    assert len(readings) == 4 and [r.flipped for r in readings] == [False, False, True, True]

    def read(text, confidence):
        return Recognition(text, confidence, (), 10, 100, (80, 20))

    outcomes = [read("SIHL", 0.4), read("EXIT", 0.95), read("THIS", 0.9), read("LIXE", 0.3)]
    chosen = settle_directions(crops, {0, 1}, readings, outcomes)
    assert [(c.flipped, o.text) for c, o in chosen] == [(True, "THIS"), (False, "EXIT")]
    failed = [Failure("engine", "infer"), outcomes[1], outcomes[2], Failure("engine", "infer")]
    chosen = settle_directions(crops, {0, 1}, readings, failed)
    assert [(c.flipped, getattr(o, "text", None)) for c, o in chosen] == [
        (True, "THIS"), (False, "EXIT")]
    only_turned = direction_readings(crops, {1}, verify=False)
    assert [r.flipped for r in only_turned] == [False, True]
