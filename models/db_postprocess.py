"""DB post-processing: text boxes from a detector's probability map.

Differentiable Binarization (Liao et al., "Real-time Scene Text Detection with Differentiable
Binarization", AAAI 2020), inference side, as PaddleOCR ``ppocr/postprocess/db_postprocess.py``
describes it: binarise the probability map at ``thresh`` (optionally dilated), take the
contours, fit each a minimum-area rectangle, score it by the mean probability inside, drop
boxes under ``box_thresh`` or too small, grow ("unclip") the survivors by
``D = area * unclip_ratio / perimeter`` (the paper's shrink ratio inverted), fit a minimum-area
rectangle again and scale it to the original image. Contours, rectangles and masks come from
OpenCV, the offset from pyclipper and the area and perimeter from shapely.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

from models.det_spec import DetectorSpec


@dataclass(frozen=True)
class TextBox:
    """One detected text region.

    Attributes:
        points: float32 ``[4, 2]`` ``(x, y)`` corners in pixels of the original image,
            clockwise from the top-left (image axes: y grows downwards).
        score: mean text probability inside the box before unclipping, in ``[0, 1]``.
    """

    points: np.ndarray
    score: float


def order_clockwise(points: np.ndarray) -> np.ndarray:
    """The 4 corners of a rectangle as float32 ``[4, 2]``: top-left, top-right, bottom-right,
    bottom-left (the two leftmost corners are the left side, the upper of them first)."""
    points = np.asarray(points, np.float32).reshape(4, 2)
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1], kind="stable")]
    top_right, bottom_right = right[np.argsort(right[:, 1], kind="stable")]
    return np.stack([top_left, top_right, bottom_right, bottom_left])


def _min_area_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    rect = cv2.minAreaRect(np.asarray(points, np.float32).reshape(-1, 1, 2))
    return order_clockwise(cv2.boxPoints(rect)), float(min(rect[1]))


def box_score(prob: np.ndarray, polygon: np.ndarray) -> float:
    """Mean of ``prob`` (float32 ``[H, W]``) inside ``polygon`` (``[K, 2]`` map pixels)."""
    height, width = prob.shape
    polygon = np.asarray(polygon, np.float32).reshape(-1, 2)
    x0 = int(np.clip(np.floor(polygon[:, 0].min()), 0, width - 1))
    x1 = int(np.clip(np.ceil(polygon[:, 0].max()), 0, width - 1))
    y0 = int(np.clip(np.floor(polygon[:, 1].min()), 0, height - 1))
    y1 = int(np.clip(np.ceil(polygon[:, 1].max()), 0, height - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    shifted = np.round(polygon - (x0, y0)).astype(np.int32)
    cv2.fillPoly(mask, [shifted], 1)
    return float(cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], mask)[0])


def unclip(points: np.ndarray, ratio: float) -> list[np.ndarray]:
    """The polygon grown by ``area * ratio / perimeter`` pixels (round joins); it may split
    into several polygons or vanish (empty list)."""
    polygon = Polygon(points)
    if polygon.length == 0:
        return []
    distance = polygon.area * ratio / polygon.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath([tuple(p) for p in np.asarray(points, np.float64).tolist()],
                   pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return [np.asarray(path, np.float32) for path in offset.Execute(distance)]


def boxes_from_map(prob: np.ndarray, spec: DetectorSpec,
                   image_size: tuple[int, int]) -> list[TextBox]:
    """The text boxes of one probability map.

    Args:
        prob: float32 ``[H, W]`` text probabilities of the resized input.
        spec: thresholds and unclip ratio (:class:`models.det_spec.DetectorSpec`).
        image_size: the original image's ``(width, height)``; boxes are scaled to it.

    Returns:
        :class:`TextBox` es, in contour order (OpenCV's), at most ``spec.max_candidates``.
    """
    height, width = prob.shape
    bitmap = (prob > spec.thresh).astype(np.uint8)
    if spec.use_dilation:
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale = np.array([image_size[0] / width, image_size[1] / height], np.float32)
    boxes = []
    for contour in contours[: spec.max_candidates]:
        corners, short_side = _min_area_box(contour)
        if short_side < spec.min_box_side:
            continue
        region = contour.reshape(-1, 2) if spec.score_mode == "slow" else corners
        score = box_score(prob, region)
        if score < spec.box_thresh:
            continue
        grown = unclip(corners, spec.unclip_ratio)
        if len(grown) != 1:
            continue
        corners, short_side = _min_area_box(grown[0])
        if short_side < spec.min_box_side + 2:
            continue
        points = np.clip(corners * scale, 0, np.array(image_size, np.float32))
        boxes.append(TextBox(points.astype(np.float32), score))
    return boxes
