"""Recognition metrics as pure functions, and the evaluation protocol in one place.

Protocol (:data:`PROTOCOL`): the field's scoring convention (clovaai
deep-text-recognition-benchmark, MMOCR, PaddleOCR): lower-case both prediction and label
and remove every character outside ``0-9a-z`` before comparing. Case-sensitive word
accuracy compares the raw strings. The field's convention is for Latin text: on Chinese
labels it would erase every character and score any prediction correct, so a set whose labels
are mostly non-ASCII letters is scored by exact match (:data:`EXACT_PROTOCOL`;
:func:`protocol_for` chooses, the report names the choice).

Metrics:
    word accuracy: exact matches / samples.
    1 - NED: ICDAR 2019 (ArT, ReCTS, LSVT) normalised edit distance,
        ``1 - mean(lev(p, g) / max(|p|, |g|))``, a pair of empty strings counting 0.
    CER: character error rate, ``sum(lev(p, g)) / sum(|g|)``; None where the labels hold
        no character but the predictions do (undefined: errors over nothing).
Edit distances come from rapidfuzz (uniform Levenshtein weights).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

PROTOCOL = (
    "lower-case both sides, keep only 0-9a-z (deep-text-recognition-benchmark/MMOCR/PaddleOCR)"
)
EXACT_PROTOCOL = "exact match of the raw strings (labels mostly non-Latin: 0-9a-z would erase them)"
PROTOCOLS = {"field": PROTOCOL, "exact": EXACT_PROTOCOL}
_OUTSIDE_ALNUM = re.compile(r"[^0-9a-z]")


def protocol_for(labels: Sequence[str]) -> str:
    """``"exact"`` when more than half of ``labels`` hold a non-ASCII letter or digit (Chinese,
    say), else ``"field"``: a few accented words keep a Latin set on the field's protocol."""
    foreign = sum(any(c.isalnum() and not c.isascii() for c in label) for label in labels)
    return "exact" if foreign * 2 > len(labels) else "field"


def normalise_text(text: str, protocol: str = "field") -> str:
    """``text`` as ``protocol`` compares it (``"field"``: :func:`field_protocol`; ``"exact"``:
    as is).

    Raises:
        ValueError: an unknown protocol.
    """
    if protocol == "field":
        return field_protocol(text)
    if protocol == "exact":
        return text
    raise ValueError(f"unknown protocol {protocol!r} (field or exact)")


def field_protocol(text: str) -> str:
    """The field's normalisation: lower-case, then drop every character outside ``0-9a-z``."""
    return _OUTSIDE_ALNUM.sub("", text.lower())


def is_correct(prediction: str, label: str, protocol: str = "field") -> bool:
    """Whether ``prediction`` matches ``label`` under ``protocol`` (:func:`normalise_text`)."""
    return normalise_text(prediction, protocol) == normalise_text(label, protocol)


def recognition_metrics(
    predictions: Sequence[str], labels: Sequence[str], protocol: str = "field"
) -> dict[str, float | int | None]:
    """Scores of ``predictions`` against ``labels`` (same length, same order).

    Returns:
        ``{"samples", "correct", "accuracy", "correct_case_sensitive",
        "accuracy_case_sensitive", "one_minus_ned", "cer"}``; accuracy, 1-NED and CER
        under ``protocol`` (:func:`normalise_text`). All rates are 0.0 for zero samples, and a
        perfect score is exactly 1.0 (no epsilon anywhere).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    count = len(labels)
    pred_norm = [normalise_text(p, protocol) for p in predictions]
    label_norm = [normalise_text(g, protocol) for g in labels]
    correct = sum(p == g for p, g in zip(pred_norm, label_norm))
    correct_cs = sum(p == g for p, g in zip(predictions, labels))
    ned = sum(Levenshtein.normalized_distance(p, g) for p, g in zip(pred_norm, label_norm))
    edits = sum(Levenshtein.distance(p, g) for p, g in zip(pred_norm, label_norm))
    chars = sum(len(g) for g in label_norm)
    return {
        "samples": count,
        "correct": correct,
        "accuracy": correct / count if count else 0.0,
        "correct_case_sensitive": correct_cs,
        "accuracy_case_sensitive": correct_cs / count if count else 0.0,
        "one_minus_ned": 1.0 - ned / count if count else 0.0,
        "cer": edits / chars if chars else (None if edits else 0.0),
    }


def accuracy_by_width(
    widths: Sequence[int], correct: Sequence[bool], bucket: int = 32
) -> dict[str, dict[str, float | int]]:
    """Word accuracy per resized-width bucket of ``bucket`` pixels (``"96-127"``: 96..127 px)."""
    groups: dict[int, list[bool]] = {}
    for width, ok in zip(widths, correct):
        groups.setdefault(width // bucket * bucket, []).append(bool(ok))
    return {
        f"{low}-{low + bucket - 1}": {"samples": len(oks), "accuracy": sum(oks) / len(oks)}
        for low, oks in sorted(groups.items())
    }
