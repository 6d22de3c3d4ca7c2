"""ICDAR 2015 scoring of full-image OCR: detection and end-to-end precision, recall, H-mean.

Protocols (the Robust Reading Competition's scripts for ICDAR 2015 Incidental Scene Text,
tasks 4.1 and 4.4, as PaddleOCR ``ppocr/metrics/eval_det_iou.py`` re-implements the first):

Detection (:data:`DET_PROTOCOL`):
    A ground-truth region transcribed ``###`` is "don't care". A detection whose area lies more
    than half inside one don't-care region is ignored. The other detections and ground-truth
    regions are matched one to one, greedily in ground-truth then detection order, at polygon
    IoU > 0.5. Precision = matches / detections cared for, recall = matches / regions cared
    for, each summed over the whole set (not averaged per image); H-mean = 2PR / (P + R).
End to end, generic (no lexicon; :data:`E2E_PROTOCOL`):
    As detection, with ground-truth words of fewer than 3 characters also "don't care"; a
    matched pair counts only when the words are equal after :func:`normalise_word`
    (case-insensitive, punctuation and symbols stripped at both ends).

Polygon areas and intersections come from shapely; a self-intersecting quadrilateral is
repaired with ``shapely.make_valid`` first.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import shapely
from shapely.geometry import Polygon

from preprocess.icdar_gt import GtWord

DET_PROTOCOL = (
    "ICDAR 2015 task 4.1 (RRC; PaddleOCR eval_det_iou.py): IoU > 0.5, one-to-one, '###' "
    "don't care (detections > 50% inside one ignored), summed over the set"
)
E2E_PROTOCOL = (
    "ICDAR 2015 task 4.4 generic (RRC): detection protocol plus equal words, case-insensitive, "
    "punctuation stripped at the ends; ground-truth words under 3 characters don't care"
)
IOU_THRESHOLD = 0.5
DONT_CARE_AREA = 0.5
MIN_E2E_CHARS = 3


@dataclass(frozen=True)
class Detection:
    """One predicted region: four ``(x, y)`` pixels of the original image, and its text."""

    points: tuple[tuple[float, float], ...]
    text: str = ""
    confidence: float = 1.0


def normalise_word(text: str) -> str:
    """The end-to-end comparison form: punctuation and symbols (Unicode categories P* and S*)
    stripped at both ends, then case-folded."""
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start])[0] in "PS":
        start += 1
    while end > start and unicodedata.category(text[end - 1])[0] in "PS":
        end -= 1
    return text[start:end].casefold()


def _polygon(points: Sequence[Sequence[float]]):
    polygon = Polygon(points)
    return polygon if polygon.is_valid else shapely.make_valid(polygon)


def _iou(a, b) -> float:
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


@dataclass
class ImageCounts:
    """Counts of one image (detection ``det_*`` and end-to-end ``e2e_*``)."""

    gt_care: int = 0
    det_care: int = 0
    matched: int = 0
    e2e_gt_care: int = 0
    e2e_det_care: int = 0
    e2e_correct: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _match(gt_polys, gt_ignored, det_polys, det_ignored):
    """One-to-one greedy matches ``[(gt, det)]`` at IoU > 0.5 among the cared-for ones."""
    gt_used, det_used, pairs = set(), set(), []
    for g, gp in enumerate(gt_polys):
        if g in gt_ignored:
            continue
        for d, dp in enumerate(det_polys):
            if d in det_used or d in det_ignored or g in gt_used:
                continue
            if _iou(gp, dp) > IOU_THRESHOLD:
                gt_used.add(g)
                det_used.add(d)
                pairs.append((g, d))
    return pairs


def _ignored_detections(det_polys, gt_polys, dont_care: set[int]) -> set[int]:
    ignored = set()
    for d, dp in enumerate(det_polys):
        area = dp.area
        for g in dont_care:
            if area > 0 and dp.intersection(gt_polys[g]).area / area > DONT_CARE_AREA:
                ignored.add(d)
                break
    return ignored


def score_image(gts: Sequence[GtWord], detections: Sequence[Detection]) -> ImageCounts:
    """Detection and end-to-end counts of one image (see the module docstring)."""
    gt_polys = [_polygon(g.points) for g in gts]
    det_polys = [_polygon(d.points) for d in detections]
    counts = ImageCounts()

    det_dont_care = {i for i, g in enumerate(gts) if g.dont_care}
    det_ignored = _ignored_detections(det_polys, gt_polys, det_dont_care)
    counts.gt_care = len(gts) - len(det_dont_care)
    counts.det_care = len(detections) - len(det_ignored)
    counts.matched = len(_match(gt_polys, det_dont_care, det_polys, det_ignored))

    e2e_dont_care = det_dont_care | {
        i for i, g in enumerate(gts) if len(normalise_word(g.text)) < MIN_E2E_CHARS
    }
    e2e_ignored = _ignored_detections(det_polys, gt_polys, e2e_dont_care)
    counts.e2e_gt_care = len(gts) - len(e2e_dont_care)
    counts.e2e_det_care = len(detections) - len(e2e_ignored)
    counts.e2e_correct = sum(
        normalise_word(gts[g].text) == normalise_word(detections[d].text)
        for g, d in _match(gt_polys, e2e_dont_care, det_polys, e2e_ignored)
    )
    return counts


def prh(hits: int, detections: int, truths: int) -> dict[str, float]:
    """``{"precision", "recall", "hmean"}``; a rate over nothing is 0.0."""
    precision = hits / detections if detections else 0.0
    recall = hits / truths if truths else 0.0
    hmean = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "hmean": hmean}


def score_set(
    gts: Mapping[str, Sequence[GtWord]], predictions: Mapping[str, Sequence[Detection]]
) -> tuple[dict[str, object], dict[str, ImageCounts]]:
    """Score every ground-truth image; an image without predictions counts as no detections.

    Returns:
        The set's ``{"detection": {...}, "end_to_end": {...}}`` (precision, recall, H-mean,
        the counts and the protocol) and the per-image counts.
    """
    rows = {name: score_image(words, predictions.get(name, ())) for name, words in gts.items()}
    total = ImageCounts()
    for counts in rows.values():
        for key, value in counts.as_dict().items():
            setattr(total, key, getattr(total, key) + value)
    summary = {
        "detection": {
            **prh(total.matched, total.det_care, total.gt_care),
            "matched": total.matched, "detections": total.det_care, "ground_truth": total.gt_care,
            "protocol": DET_PROTOCOL,
        },
        "end_to_end": {
            **prh(total.e2e_correct, total.e2e_det_care, total.e2e_gt_care),
            "correct": total.e2e_correct, "detections": total.e2e_det_care,
            "ground_truth": total.e2e_gt_care, "protocol": E2E_PROTOCOL,
        },
    }
    return summary, rows
