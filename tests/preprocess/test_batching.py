"""Batch planning: every sample once, widths grouped, padding bounded."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.batching import pad_to_batch, plan_batches


@pytest.mark.parametrize("max_pad", [0, 8, 1000])
def test_every_sample_once_and_padding_bounded(max_pad):
    widths = list(np.random.default_rng(1).integers(96, 193, 200))
    batches = plan_batches(widths, 16, max_pad)
    assert sorted(p for b in batches for p in b) == list(range(200))
    assert all(1 <= len(b) <= 16 for b in batches)
    assert all(max(widths[p] for p in b) - min(widths[p] for p in b) <= max_pad for b in batches)


def test_equal_width_buckets():
    assert plan_batches([5, 4, 5, 4, 4], 2) == [[1, 3], [4], [0, 2]]


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_batches([1], 0)
    with pytest.raises(ValueError):
        plan_batches([1], 1, -1)


def test_pad_to_batch_right_pads():
    batch = pad_to_batch([np.ones((1, 2, 3), np.float32), np.ones((1, 2, 1), np.float32)],
                         pad_value=-5)
    assert batch.shape == (2, 1, 2, 3)
    assert np.all(batch[1, 0, :, 1:] == -5) and np.all(batch[1, 0, :, :1] == 1)
    colour = pad_to_batch([np.ones((3, 4, 2), np.float32), np.full((3, 4, 5), 2, np.float32)])
    assert colour.shape == (2, 3, 4, 5) and np.all(colour[0, :, :, 2:] == 0)


def test_batch_inputs_normalise_plan_and_pad():
    from models.registry import spec_for_arch
    from preprocess.batching import batch_inputs

    spec = spec_for_arch("nano-ocr")
    pixels = [np.full((32, w), 255, np.uint8) for w in (100, 96, 100, 120)]
    planned = batch_inputs(pixels, spec, batch_size=2)
    assert [positions for positions, _ in planned] == [[1], [0, 2], [3]]
    assert [batch.shape for _, batch in planned] == [(1, 1, 32, 96), (2, 1, 32, 100),
                                                      (1, 1, 32, 120)]
    assert all(np.all(batch == 1.0) for _, batch in planned)  # (1 - 0.5) / 0.5
