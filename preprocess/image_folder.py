"""Folders of image files: which entries are images, in which order, and reading one.

The one reader of image folders (full-image OCR, detector calibration, benches): entries
named like images that are not regular files (folders, dangling or looping links, FIFOs,
devices) are listed with their reason instead of being read or silently skipped.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from preprocess.image import SampleError, decode_rgb

#: Environment variable naming the photos a detector is calibrated on (``convert.quantize``).
DETECTOR_CALIBRATION_ENV = "DET_CALIB_IMAGES"


def default_detector_calibration() -> Path:
    """``$DET_CALIB_IMAGES``, else ``../shared/data/IC15_test_even/images`` beside the
    repository (``convert.quantize`` takes its first 50 images; the benches score int8
    detectors on the others)."""
    fallback = Path(__file__).resolve().parents[2] / "shared" / "data" / "IC15_test_even" / "images"
    return Path(os.environ.get(DETECTOR_CALIBRATION_ENV, fallback))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


def not_a_file(path: Path) -> str | None:
    """Why an entry named like an image is not read (a folder, a dangling or looping
    symbolic link, a FIFO, a device, a socket), or None for a regular file (or a link to
    one). A FIFO or a link to ``/dev/zero`` would block or never end a read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link that loops"
        if path.is_symlink():
            return "a dangling symbolic link"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"{kind}, not an image file"


def scan_images(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """One pass over ``folder``: its image files (by suffix, regular files only), in natural
    order (``img_2`` before ``img_10``), and the entries named like images that are not image
    files, each as ``{"image": name, "reason": ...}`` (:func:`not_a_file`), by name.

    Raises:
        ToolchainError: not a folder, or no image in it.
    """
    if not folder.is_dir():
        raise ToolchainError(f"{folder}: not a folder of images")
    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        reason = not_a_file(path)
        if reason is None:
            files.append(path)
        else:
            skipped.append({"image": path.name, "reason": reason})
    if not files:
        raise ToolchainError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")

    def natural(path: Path):
        digits = "".join(c if c.isdigit() else " " for c in path.stem).split()
        return (path.stem.rstrip("0123456789"), [int(d) for d in digits], path.name)

    return sorted(files, key=natural), skipped


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (:func:`scan_images`).

    Raises:
        ToolchainError: not a folder, or no image in it.
    """
    return scan_images(folder)[0]


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` RGB pixels of an image file (EXIF orientation not applied: the
    ground truth is in stored pixels).

    Raises:
        SampleError: unreadable, undecodable, or over ``max_pixels`` (checked before decoding).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SampleError(f"unreadable ({exc.strerror or exc})") from None
    return decode_rgb(raw, max_pixels)
