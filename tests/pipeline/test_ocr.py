"""Word boxes from CTC alignment, and the crop geometry, on rendered lines with known words."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from infer import open_model
from pipeline.ocr import crop_box, split_words, word_spans
from pipeline.recognizer import Recognition, Recognizer
from tests.conftest import render_line

WORDS = ["OPEN", "DAILY", "2026"]


@pytest.fixture(scope="module")
def recognizer(ppocr_rec_path):
    runner, spec = open_model(ppocr_rec_path, threads=1)
    with Recognizer(runner, spec) as rec:
        yield rec


def test_word_spans_from_frames():
    # 16 frames over 64 px: frame f is centred at 4 f + 2.
    recognition = Recognition("ab cd", 0.9, (2, 4, 6, 10, 12), 16, 64, (64, 16))
    spans = word_spans(recognition, lambda f: (f + 0.5) * 64 / 16)
    # Centres 10, 18, (26), 42, 50; pitch (50 - 10) / 4 = 10: cuts half a pitch out, inside
    # the gap's midpoint 30.
    assert spans == [("ab", 0.0, 23.0), ("cd", 37.0, 64.0)]
    single = Recognition("word", 0.9, (1, 2, 3, 4), 16, 64, (64, 16))
    assert word_spans(single, lambda f: f) == [("word", 0.0, 64.0)]


def test_crop_box_undoes_a_rotation():
    image, _ = render_line(WORDS)
    height, width = image.shape[:2]
    canvas = np.full((400, 600, 3), 255, np.uint8)
    turn = cv2.getRotationMatrix2D((0, 0), -12, 1.0)  # clockwise on screen (y down)
    turn[:, 2] = (60, 80)
    canvas = cv2.warpAffine(image, turn, (600, 400), dst=canvas,
                            borderMode=cv2.BORDER_TRANSPARENT)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    points = cv2.transform(corners[None], turn)[0]
    crop, matrix = crop_box(canvas, points)
    assert abs(crop.shape[1] - width) <= 1 and abs(crop.shape[0] - height) <= 1
    # The crop is the line again (up to interpolation).
    same = crop[: height - 2, : width - 2].astype(int) - image[: height - 2, : width - 2]
    assert np.abs(same).mean() < 12
    np.testing.assert_allclose(cv2.perspectiveTransform(points[None], matrix)[0], corners,
                               atol=1e-3)


@pytest.mark.parametrize("angle", [0.0, -12.0])
def test_split_words_on_a_rendered_line(recognizer, angle):
    line, truth = render_line(WORDS)
    height, width = line.shape[:2]
    canvas = np.full((420, 640, 3), 255, np.uint8)
    turn = cv2.getRotationMatrix2D((0, 0), angle, 1.0)
    turn[:, 2] = (40, 120)
    canvas = cv2.warpAffine(line, turn, (640, 420), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    crop, matrix = crop_box(canvas, cv2.transform(corners[None], turn)[0])
    (recognition,) = recognizer([crop])
    assert recognition.text == " ".join(WORDS)
    words = split_words(recognition, matrix, recognizer.spec)
    assert [w for w, _ in words] == WORDS
    for (_, quad), (x0, _, x1, _) in zip(words, truth):
        # Back in the line's own coordinates, the quad is the band [a, b] x [0, height].
        local = cv2.perspectiveTransform(quad[None].astype(np.float32), matrix)[0]
        a, b = local[:, 0].min(), local[:, 0].max()
        np.testing.assert_allclose(local[:, 1], [0, 0, height, height], atol=0.5)
        # ... and [a, b] covers the word's ink, with less than a character's pitch around it.
        overlap = min(b, x1) - max(a, x0)
        assert overlap / (x1 - x0) > 0.95
        assert overlap / (b - a) > 0.7, (a, b, x0, x1)
