"""DB post-processing on synthetic probability maps with known boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.db_postprocess import boxes_from_map, order_clockwise, unclip
from models.det_spec import DetectorSpec

SPEC = DetectorSpec(arch="test", unclip_ratio=1.5, box_thresh=0.6, thresh=0.3)


def grown(width: float, height: float, ratio: float) -> tuple[float, float]:
    """Sides of a width x height rectangle after unclipping by area * ratio / perimeter."""
    distance = width * height * ratio / (2 * (width + height))
    return width + 2 * distance, height + 2 * distance


def test_axis_aligned_regions_give_their_unclipped_rectangles():
    prob = np.zeros((200, 300), np.float32)
    prob[40:60, 20:120] = 0.9  # 100 x 20 pixels
    prob[120:150, 150:280] = 0.8  # 130 x 30
    boxes = boxes_from_map(prob, SPEC, (300, 200))
    assert len(boxes) == 2
    by_x = sorted(boxes, key=lambda b: b.points[0, 0])
    for box, (x0, y0, w, h), score in zip(by_x, [(20, 40, 100, 20), (150, 120, 130, 30)],
                                          (0.9, 0.8)):
        # OpenCV's contour runs through the outer pixels' centres: (w - 1) x (h - 1).
        gw, gh = grown(w - 1, h - 1, SPEC.unclip_ratio)
        cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
        expected = np.array([[cx - gw / 2, cy - gh / 2], [cx + gw / 2, cy - gh / 2],
                             [cx + gw / 2, cy + gh / 2], [cx - gw / 2, cy + gh / 2]])
        assert np.abs(box.points - expected).max() < 0.6  # pyclipper works on integers
        assert box.score == pytest.approx(score, abs=0.03)


def test_scaled_to_the_original_image():
    prob = np.zeros((100, 100), np.float32)
    prob[40:60, 20:80] = 1.0
    (small,) = boxes_from_map(prob, SPEC, (100, 100))
    (large,) = boxes_from_map(prob, SPEC, (400, 200))  # the map was the image resized 4x, 2x
    np.testing.assert_allclose(large.points, small.points * [4, 2], atol=1e-3)


def test_rotated_region():
    prob = np.zeros((300, 300), np.float32)
    rect = ((150, 150), (160, 30), 30.0)  # centre, size, angle in degrees
    corners = cv2.boxPoints(rect)
    cv2.fillPoly(prob, [np.round(corners).astype(np.int32)], 0.95)
    (box,) = boxes_from_map(prob, SPEC, (300, 300))
    sides = np.linalg.norm(np.roll(box.points, -1, axis=0) - box.points, axis=1)
    gw, gh = grown(160, 30, SPEC.unclip_ratio)
    assert sorted(sides[:2]) == pytest.approx(sorted([gw, gh]), abs=2.5)
    assert box.points.mean(axis=0) == pytest.approx([150, 150], abs=1.0)
    # Clockwise from the top-left in image axes: the signed area (shoelace) is positive.
    x, y = box.points[:, 0], box.points[:, 1]
    assert 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) > 0


def test_weak_and_tiny_regions_are_dropped():
    prob = np.zeros((100, 200), np.float32)
    prob[10:30, 10:90] = 0.45  # above thresh 0.3, under box_thresh 0.6
    prob[50:52, 100:140] = 0.99  # 2 pixels high: under min_box_side 3
    prob[70:90, 100:180] = 0.9
    boxes = boxes_from_map(prob, SPEC, (200, 100))
    assert len(boxes) == 1 and boxes[0].points[:, 1].mean() == pytest.approx(79.5, abs=0.6)
    assert len(boxes_from_map(prob, SPEC.replace(box_thresh=0.4), (200, 100))) == 2


def test_max_candidates_and_empty_map():
    prob = np.zeros((100, 400), np.float32)
    for k in range(5):
        prob[40:60, 10 + 80 * k:70 + 80 * k] = 0.9
    assert len(boxes_from_map(prob, SPEC, (400, 100))) == 5
    assert len(boxes_from_map(prob, SPEC.replace(max_candidates=2), (400, 100))) == 2
    assert boxes_from_map(np.zeros((64, 64), np.float32), SPEC, (64, 64)) == []


def test_order_clockwise_and_unclip():
    shuffled = np.array([[10, 10], [0, 10], [10, 0], [0, 0]], np.float32)
    np.testing.assert_array_equal(order_clockwise(shuffled),
                                  [[0, 0], [10, 0], [10, 10], [0, 10]])
    (polygon,) = unclip(np.array([[0, 0], [100, 0], [100, 20], [0, 20]], np.float32), 1.5)
    distance = 100 * 20 * 1.5 / 240
    assert polygon[:, 0].min() == pytest.approx(-distance, abs=1)
    assert polygon[:, 1].max() == pytest.approx(20 + distance, abs=1)
    assert unclip(np.zeros((4, 2), np.float32), 1.5) == []
