"""Metric tables: protocol, case, symbols, empty strings, perfect scores."""

from __future__ import annotations

import pytest

from eval.metrics import accuracy_by_width, field_protocol, recognition_metrics


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
