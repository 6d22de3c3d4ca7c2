"""Group samples of mixed widths into batches (PaddleOCR's sort-by-width, done tighter).

Samples are sorted by resized width (ties by position, so the plan is deterministic), and a
batch is closed when it is full or when the next sample is more than ``max_pad`` pixels
wider than the batch's narrowest one. With ``max_pad=0`` (the default) a batch holds one
width only: nothing is padded, so batched inference computes exactly what batch-1
inference computes. PaddleOCR's users found that right padding changes predictions (the
backward LSTM reads the padding first); equal-width buckets avoid that by construction.

:func:`batch_inputs` is the one place that turns resized pixels into model input batches
(normalise, plan, pad); preprocessing, calibration and the in-memory recogniser call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.spec import ModelSpec
from preprocess.image import normalise

#: Value written into padded columns: normalised 0.0, i.e. the value the first
#: convolution's own zero padding puts beside the image in batch-1 inference.
PAD_VALUE = 0.0


def plan_batches(widths: Sequence[int], batch_size: int, max_pad: int = 0) -> list[list[int]]:
    """Positions of ``widths`` grouped into batches.

    Args:
        widths: resized width of each sample, in pixels.
        batch_size: most samples per batch (>= 1).
        max_pad: most pixels of right padding any sample may receive (>= 0).

    Returns:
        Lists of positions into ``widths``; every position appears exactly once, batches
        ordered by width.

    Raises:
        ValueError: ``batch_size < 1`` or ``max_pad < 0``.
    """
    if batch_size < 1 or max_pad < 0:
        raise ValueError(f"need batch_size >= 1 and max_pad >= 0, got {batch_size}, {max_pad}")
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    batches: list[list[int]] = []
    for position in order:
        current = batches[-1] if batches else None
        if (current is None or len(current) == batch_size
                or widths[position] - widths[current[0]] > max_pad):
            batches.append([position])
        else:
            current.append(position)
    return batches


def pad_to_batch(images: Sequence[np.ndarray], pad_value: float = PAD_VALUE) -> np.ndarray:
    """Stack ``[C, H, W_i]`` float32 images into ``[N, C, H, max W_i]``, right-padded."""
    channels, height = images[0].shape[:2]
    width = max(image.shape[-1] for image in images)
    batch = np.full((len(images), channels, height, width), pad_value, dtype=np.float32)
    for row, image in enumerate(images):
        batch[row, :, :, : image.shape[-1]] = image
    return batch


def batch_inputs(
    pixels: Sequence[np.ndarray], spec: ModelSpec, batch_size: int, max_pad: int = 0
) -> list[tuple[list[int], np.ndarray]]:
    """Model input batches of resized images.

    Args:
        pixels: uint8 resized images (``preprocess.image.resize``), ``[H, W]`` or ``[H, W, C]``.
        spec: the model description (normalisation).
        batch_size, max_pad: see :func:`plan_batches`.

    Returns:
        ``(positions into pixels, float32 [B, C, H, W])`` per batch, ordered by width.
    """
    widths = [image.shape[1] for image in pixels]
    return [
        (positions, pad_to_batch([normalise(pixels[p], spec) for p in positions]))
        for positions in plan_batches(widths, batch_size, max_pad)
    ]
