"""The shared argparse number types refuse what no option means: NaN, infinity, and values
outside their range."""

from __future__ import annotations

import argparse

import pytest

from common.cli import non_negative, positive, probability


@pytest.mark.parametrize("parse, good, bad", [
    (positive(float), ["1e-4", "3"], ["0", "-1", "nan", "inf", "-inf"]),
    (positive(int), ["1", "16"], ["0", "-2"]),
    (non_negative, ["0", "2.5"], ["-0.1", "nan", "inf"]),
    (probability, ["0", "0.5", "1"], ["-0.1", "1.5", "nan", "inf"]),
])
def test_number_types(parse, good, bad):
    for text in good:
        assert parse(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=text.lstrip("+")):
            parse(text)
