"""Decoding, grey conversion, width policy and normalisation of single samples."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.registry import spec_for_arch
from preprocess.image import SampleError, decode_image, decode_label, normalise, prepare, to_grey
from tests.conftest import encode

NANO = spec_for_arch("nano-ocr")


def test_identity_resize_matches_independent_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 128), dtype=np.uint8)
    resized, size = prepare(encode(Image.fromarray(pixels)), NANO)
    assert size == (128, 32)
    np.testing.assert_array_equal(resized, pixels)
    expected = (pixels.astype(np.float64) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(normalise(resized, NANO), expected[None], atol=1e-6)


def test_three_channel_models_get_bgr_channels_first():
    bgr = NANO.replace(channels=3, channel_order="bgr", height=48, min_width=48, max_width=480)
    image = Image.new("RGB", (96, 48), (200, 100, 50))
    resized, _ = prepare(encode(image), bgr)
    assert resized.shape == (48, 96, 3) and resized[0, 0].tolist() == [50, 100, 200]
    chw = normalise(resized, bgr)
    assert chw.shape == (3, 48, 96)
    np.testing.assert_allclose(chw[:, 0, 0], (np.array([50, 100, 200]) / 255 - 0.5) / 0.5,
                               atol=1e-6)
    grey, _ = prepare(encode(Image.new("L", (96, 48), 77)), bgr)  # grey in, three channels out
    assert grey.shape == (48, 96, 3) and np.all(grey == 77)
    per_channel = bgr.replace(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 2.0))
    np.testing.assert_allclose(normalise(resized, per_channel)[:, 0, 0],
                               (np.array([50, 100, 200]) / 255 - [0.1, 0.2, 0.3]) / [1, 1, 2],
                               atol=1e-6)


def test_rgb_uses_itu_601_luma():
    image = Image.new("RGB", (256, 64), (200, 100, 50))
    resized, _ = prepare(encode(image), NANO)
    luma = 200 * 299 / 1000 + 100 * 587 / 1000 + 50 * 114 / 1000
    assert resized.shape == (32, 128)
    assert np.all(np.abs(resized.astype(int) - luma) <= 1)


def test_sixteen_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16))
    grey = to_grey(Image.open(__import__("io").BytesIO(encode(image))))
    assert grey.mode == "L" and abs(int(np.asarray(grey)[0, 0]) - 128) <= 1


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.all(np.asarray(to_grey(image)) == 255)


@pytest.mark.parametrize(
    ("policy", "size", "expected"),
    [
        ({"width_policy": "fixed"}, (300, 20), 128),
        ({"width_policy": "keep-ratio"}, (226, 55), 131),  # 131.49
        ({"width_policy": "keep-ratio"}, (257, 64), 129),  # 128.5 rounds half up
        ({"width_policy": "keep-ratio"}, (40, 40), 96),  # clamped up to min_width
        ({"width_policy": "keep-ratio"}, (2600, 20), 192),  # clamped down to max_width
        ({"width_policy": "keep-ratio", "width_step": 16}, (226, 55), 128),
    ],
)
def test_width_policy(policy, size, expected):
    resized, _ = prepare(encode(Image.new("L", size, 128)), NANO.replace(**policy))
    assert resized.shape == (32, expected)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(None, "missing image key"), (b"", "empty"), (b"GIF89a junk", "not a decodable image"),
     (b"P5\n0 10\n255\n", "not a decodable image")],  # zero-width: Pillow refuses it
)
def test_bad_images(raw, reason):
    with pytest.raises(SampleError, match=reason):
        decode_image(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(None, "missing label key"), (b"\xff\xfe", "not UTF-8"), (b"", "empty label"),
     (b"  ", "empty label"), (b"two\nlines", "line break"), (b"cr\r", "line break")],
)
def test_bad_labels(raw, reason):
    with pytest.raises(SampleError, match=reason):
        decode_label(raw)


def test_label_case_and_unicode_kept():
    assert decode_label("Café".encode()) == "Café"
