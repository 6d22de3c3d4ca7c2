"""Decode, convert to the model's colours, resize and normalise one word image.

The steps match torchvision's ``Grayscale(1) -> Resize((32, W)) -> ToTensor() ->
Normalize((mean,), (std,))`` on a PIL image (what nano-ocr and crnn.pytorch do), without
torchvision: Pillow's ``convert("L")`` (ITU-R 601-2 luma) and ``Image.resize`` with the
model's filter, then ``(x / 255 - mean) / std`` in float32. Three-channel models
(``channel_order`` ``"rgb"`` or ``"bgr"``, e.g. PP-OCR, which reads images with OpenCV in
BGR order) get the same steps on RGB pixels, reordered to BGR where the model asks.
Everything the steps need comes from the model description.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from models.det_spec import DetectorSpec
from models.spec import Description, ModelSpec

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


#: The image formats decoded (Pillow names): what text-recognition datasets hold.
DECODABLE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
_OBJECT_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


class SampleError(ValueError):
    """A sample that cannot be turned into a model input; the message is the reason."""


class ImageTooLarge(SampleError):
    """An image whose header declares more pixels than the caller's cap (or Pillow's
    decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS`` x 2); it is never decoded."""


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
    if "\n" in label or "\r" in label:
        raise SampleError("label contains a line break (a word label is one line)")
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
    return _over_white(image).convert("L")


def _over_white(image: Image.Image) -> Image.Image:
    """``image`` composited over white where it has transparency, else unchanged."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any Pillow image (grey, 16-bit: :func:`to_grey`; alpha over white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F", "L", "1"):
        return to_grey(image).convert("RGB")
    return _over_white(image).convert("RGB")


def to_model_colours(image: Image.Image, spec: ModelSpec) -> Image.Image:
    """``image`` as 'L' for a grey model, else as 'RGB' (reordered later by :func:`resize`)."""
    return to_grey(image) if spec.channels == 1 else to_rgb(image)


def decode_image(
    raw: bytes | None, spec: ModelSpec | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode encoded image bytes into the model's colours.

    Only the formats text datasets use are tried (:data:`DECODABLE_FORMATS`), so Pillow's
    rarely used decoders (DDS, SPIDER, ...) never run on a sample.

    Args:
        raw: the encoded bytes.
        spec: the model description; None (or a grey model) gives an 8-bit grey image,
            a three-channel model an RGB one.
        max_pixels: refuse images whose header declares more pixels (width x height) than
            this, before decoding them; None: only Pillow's decompression-bomb limit.

    Raises:
        ImageTooLarge: over ``max_pixels`` or Pillow's decompression-bomb limit.
        SampleError: missing key, undecodable bytes (the decoder's exception type is in the
            reason), or a zero-sized image.
    """
    with _open_image(raw, max_pixels) as image:
        return to_grey(image) if spec is None else to_model_colours(image, spec)


#: The default cap on an image's pixels (width x height), checked in its header before
#: decoding, for every tool and the service: photos from cameras of up to 50 MP
#: passes; a decompression bomb does not. Decoding one at the cap takes 120 MB as RGB.
DEFAULT_MAX_PIXELS = 50_000_000


def decode_rgb(raw: bytes | None, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to uint8 ``[h, w, 3]`` RGB pixels (grey and 16-bit images
    as :func:`to_rgb` converts them; EXIF orientation is not applied).

    Raises:
        ImageTooLarge, SampleError: as :func:`decode_image`.
    """
    with _open_image(raw, max_pixels) as image:
        return np.asarray(to_rgb(image))


def _open_image(raw: bytes | None, max_pixels: int | None) -> Image.Image:
    """The decoded (loaded) Pillow image of ``raw``; see :func:`decode_image`."""
    if raw is None:
        raise SampleError("missing image key")
    if not raw:
        raise SampleError("image bytes are empty")
    try:
        image = Image.open(io.BytesIO(raw), formats=DECODABLE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's identifiers raise anything on bad bytes
        raise _undecodable(exc) from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"image is {image.width}x{image.height} = "
                            f"{image.width * image.height} pixels, over the cap of {max_pixels}")
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise anything on bad bytes
        raise _undecodable(exc) from None
    if image.width == 0 or image.height == 0:
        raise SampleError(f"zero-sized image ({image.width}x{image.height})")
    return image


def _undecodable(exc: Exception) -> SampleError:
    # Pillow names the in-memory file by its address; keep reasons equal between runs.
    message = _OBJECT_ADDRESS.sub("", str(exc))
    return SampleError(f"not a decodable image ({type(exc).__name__}: {message})")


def resize(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Resize an image in the model's colours to ``spec.height`` x the policy's width.

    Returns:
        uint8 ``[height, width]`` (grey) or ``[height, width, 3]`` in the model's channel
        order (``rgb`` or ``bgr``).
    """
    if image.mode != ("L" if spec.channels == 1 else "RGB"):
        image = to_model_colours(image, spec)
    width = spec.resized_width(image.width, image.height)
    pixels = np.asarray(image.resize((width, spec.height), _FILTERS[spec.resample]), np.uint8)
    return pixels[..., ::-1] if spec.channel_order == "bgr" else pixels


def normalise(pixels: np.ndarray, spec: Description) -> np.ndarray:
    """``(x / 255 - mean) / std`` in float32 (same op order as torchvision), channels first.

    Args:
        pixels: uint8 ``[H, W]`` (grey) or ``[H, W, C]``, as :func:`resize` returns them.

    Returns:
        float32 ``[C, H, W]``.
    """
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    scaled = scaled[None] if scaled.ndim == 2 else np.moveaxis(scaled, -1, 0)
    mean = np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(-1, 1, 1)
    return (scaled - mean) / std


def as_image(image: Image.Image | np.ndarray) -> Image.Image:
    """A Pillow image from a Pillow image or uint8 pixels (``[H, W]`` grey or ``[H, W, 3]`` RGB).

    Raises:
        SampleError: a zero-sized image, or an array of another shape or dtype.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise SampleError(f"zero-sized image ({image.width}x{image.height})")
        return image
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] != 3)
            or 0 in image.shape
        ):
            raise SampleError(
                f"pixels must be uint8 [H, W] or [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        return Image.fromarray(image)
    raise SampleError(f"cannot read an image from a {type(image).__name__}")


def prepare(
    raw_image: bytes | Image.Image | np.ndarray | None,
    spec: ModelSpec,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (if needed) and resize one image for the model.

    ``max_pixels`` caps encoded images before decoding (see :func:`decode_image`).

    Returns:
        The resized uint8 pixels (see :func:`resize`) and the original ``(width, height)``.

    Raises:
        SampleError: with the reason the sample cannot be used.
    """
    image = _image_of(raw_image, spec, max_pixels)
    return resize(image, spec), (image.width, image.height)


def prepare_readings(
    raw_image: bytes | Image.Image | np.ndarray | None,
    spec: ModelSpec,
    max_pixels: int | None = None,
) -> tuple[list[tuple[int, np.ndarray]], tuple[int, int]]:
    """Decode (if needed) and resize one image in every orientation the model reads it in.

    A crop the description reads turned (``ModelSpec.reading_turns``: a tall crop under
    ``tall_crops="turn"``) comes back three times: as it is, turned 90 degrees
    counter-clockwise, and clockwise; any other image once, as :func:`prepare` gives it.

    Returns:
        ``[(turn, uint8 resized pixels), ...]``, the upright reading (turn 0) first, and the
        original ``(width, height)``.

    Raises:
        SampleError: with the reason the sample cannot be used.
    """
    image = _image_of(raw_image, spec, max_pixels)
    size = (image.width, image.height)
    return [(turn, resize(turned(image, turn), spec))
            for turn in spec.reading_turns(*size)], size


def turned(image: Image.Image, turn: int) -> Image.Image:
    """``image`` turned by ``turn`` quarter turns (1: counter-clockwise, -1: clockwise)."""
    if turn == 0:
        return image
    return image.transpose(Image.Transpose.ROTATE_90 if turn == 1 else Image.Transpose.ROTATE_270)


def _image_of(raw_image, spec: ModelSpec, max_pixels: int | None) -> Image.Image:
    """The Pillow image of encoded bytes (decoded into the model's colours) or of pixels."""
    if raw_image is None or isinstance(raw_image, (bytes, bytearray, memoryview)):
        return decode_image(None if raw_image is None else bytes(raw_image), spec, max_pixels)
    return as_image(raw_image)


def detector_input(rgb: np.ndarray, spec: DetectorSpec) -> np.ndarray:
    """The float32 ``[3, H, W]`` engine input for uint8 ``[h, w, 3]`` RGB pixels: resized by
    the description's rule (OpenCV bilinear), reordered, and normalised as every model input
    is (``preprocess.image.normalise``)."""
    import cv2

    width, height = spec.input_size(rgb.shape[1], rgb.shape[0])
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    if spec.channel_order == "bgr":
        resized = resized[..., ::-1]
    return np.ascontiguousarray(normalise(resized, spec))
