"""Decode, convert to grey, resize and normalise one word image for a CRNN.

The steps match torchvision's ``Grayscale(1) -> Resize((32, W)) -> ToTensor() ->
Normalize((mean,), (std,))`` on a PIL image (what nano-ocr and crnn.pytorch do), without
torchvision: Pillow's ``convert("L")`` (ITU-R 601-2 luma) and ``Image.resize`` with the
model's filter, then ``(x / 255 - mean) / std`` in float32.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from convert.spec import ModelSpec

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class SampleError(ValueError):
    """A sample that cannot be turned into a model input; the message is the reason."""


def decode_label(raw: bytes | None) -> str:
    """The UTF-8 label, case kept.

    Raises:
        SampleError: missing key, not UTF-8, or empty.
    """
    if raw is None:
        raise SampleError("missing label key")
    try:
        label = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"label is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not label.strip():
        raise SampleError("empty label")
    return label


def to_grey(image: Image.Image) -> Image.Image:
    """An 8-bit grey ('L') copy of any Pillow image.

    16-bit and 32-bit integer images are scaled by their type's range (not clipped);
    images with transparency are composited over white first, since the colour of a
    transparent pixel is undefined.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L")


def decode_image(raw: bytes | None) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) into an 8-bit grey image.

    Raises:
        SampleError: missing key, undecodable bytes, or a zero-sized image.
    """
    if raw is None:
        raise SampleError("missing image key")
    if not raw:
        raise SampleError("image bytes are empty")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise SampleError(f"zero-sized image ({image.width}x{image.height})")
            return to_grey(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        if isinstance(exc, SampleError):
            raise
        raise SampleError(f"not a decodable image ({type(exc).__name__}: {exc})") from None


def resize_grey(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Resize an 'L' image to ``spec.height`` x the policy's width.

    Returns:
        uint8 ``[height, width]``.
    """
    width = spec.resized_width(image.width, image.height)
    resized = image.resize((width, spec.height), _FILTERS[spec.resample])
    return np.asarray(resized, dtype=np.uint8)


def normalise(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """``(x / 255 - mean) / std`` in float32, any shape (same op order as torchvision)."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return (scaled - np.float32(spec.mean)) / np.float32(spec.std)


def prepare(raw_image: bytes | None, spec: ModelSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize one image.

    Returns:
        uint8 ``[height, width]`` resized pixels and the original ``(width, height)``.

    Raises:
        SampleError: with the reason the sample cannot be used.
    """
    image = decode_image(raw_image)
    return resize_grey(image, spec), (image.width, image.height)
