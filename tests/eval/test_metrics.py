"""Metric tables: protocol, case, symbols, empty strings, perfect scores."""

from __future__ import annotations

import pytest

from eval.metrics import (
    accuracy_by_width,
    field_protocol,
    is_correct,
    protocol_for,
    recognition_metrics,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("PARKING", "parking"), ("I'm", "im"), ("e-mail!", "email"), ("Café", "caf"), ("", "")],
)
def test_field_protocol(raw, normalised):
    assert field_protocol(raw) == normalised


def test_case_and_symbols():
    metrics = recognition_metrics(["parking", "Im", "abc"], ["PARKING", "I'm", "abd"])
    assert metrics["correct"] == 2 and metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["correct_case_sensitive"] == 0
    assert metrics["cer"] == pytest.approx(1 / (7 + 2 + 3))
    assert metrics["one_minus_ned"] == pytest.approx(1 - (1 / 3) / 3)


def test_perfect_score_is_exactly_one():
    metrics = recognition_metrics(["a", "Bc"], ["a", "Bc"])
    assert (
        metrics["accuracy"] == metrics["accuracy_case_sensitive"] == metrics["one_minus_ned"] == 1.0
    )
    assert metrics["cer"] == 0.0


def test_empty_strings():
    metrics = recognition_metrics(["", "abc"], ["", ""])
    assert metrics["correct"] == 1
    assert metrics["one_minus_ned"] == pytest.approx(0.5)  # ("", "") is 0, ("abc", "") is 1
    assert metrics["cer"] is None  # 3 errors over 0 label characters: undefined, not 0
    assert recognition_metrics([""], [""])["cer"] == 0.0  # nothing to get wrong, nothing wrong
    assert recognition_metrics(["ab"], ["abc"])["cer"] == pytest.approx(1 / 3)
    assert recognition_metrics([], [])["accuracy"] == 0.0


def test_length_mismatch():
    with pytest.raises(ValueError):
        recognition_metrics(["a"], [])


def test_accuracy_by_width():
    table = accuracy_by_width([96, 100, 130, 191], [True, False, True, True])
    assert table == {
        "96-127": {"samples": 2, "accuracy": 0.5},
        "128-159": {"samples": 1, "accuracy": 1.0},
        "160-191": {"samples": 1, "accuracy": 1.0},
    }


def test_chinese_labels_are_scored_by_exact_match():
    """0-9a-z erases Chinese: every prediction would count as right. A set whose labels are
    mostly non-Latin is scored by exact match; a few accented words keep the field's protocol."""
    labels, predictions = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声"], ["春眠不觉晓", "处处闻啼", ""]
    assert recognition_metrics(predictions, labels)["accuracy"] == 1.0  # the trap
    assert protocol_for(labels) == "exact"
    exact = recognition_metrics(predictions, labels, "exact")
    assert exact["correct"] == 1
    assert exact["one_minus_ned"] == pytest.approx(1 - (0 + 1 / 5 + 1) / 3)
    assert exact["cer"] == pytest.approx(6 / 15)
    assert not is_correct("处处闻啼", "处处闻啼鸟", "exact")
    assert protocol_for(["Café", "Hotel", "EXIT"]) == "field"
    assert protocol_for([]) == "field"
    with pytest.raises(ValueError, match="unknown protocol"):
        is_correct("a", "a", "loose")
