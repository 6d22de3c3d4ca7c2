"""Cut the words of ICDAR 2015-style full images into a word-crop lmdb of our format.

Every ground-truth region (``gts/gt_img_N.txt``: ``x1,y1,...,x4,y4,transcription``, read by
``preprocess.icdar_gt.read_gt_file``) except the ``###`` ones becomes one sample, cut from its
image (``images/img_N.jpg``) as:

- ``box`` (default): the axis-aligned rectangle around the quadrilateral, clipped to the image
  (how the ICDAR 2015 Task 4.3 word images were cut: upright crops that keep the rotation and
  some background);
- ``warp``: the quadrilateral rectified to an upright rectangle by a perspective transform
  (OpenCV), as the detector + recogniser pipeline reads a detected word.

Samples are ordered by image number, then by line; each crop is stored as PNG. The labels keep
their case and punctuation (scoring lower-cases them and keeps 0-9a-z). This turns the 250
test images in ``../shared/data/IC15_test_even`` into about a thousand test word crops: a
held-out stand-in for the Task 4.3 test words that are not here.

Bad input is counted, never dropped silently: an image that cannot be read loses its words
(counted per image), a region with no area after clipping is counted, a ground-truth file
without its image is counted. A malformed ground-truth line stops the run with its file and
line (it would be a wrong data set, not a bad sample).

Example:
    python -m preprocess.icdar_crops --images ../shared/data/IC15_test_even/images \\
        --gts ../shared/data/IC15_test_even/gts --out work/data/IC15_test_even_words
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from preprocess.icdar_gt import GtWord, read_gt_file
from preprocess.lmdb_writer import write_word_lmdb

CROPS = ("box", "warp")
_GT_NAME = re.compile(r"gt_(.+)\.txt$")


def box_crop(image: Image.Image, points: Sequence[tuple[float, float]]) -> Image.Image | None:
    """The axis-aligned rectangle around ``points`` (pixels), clipped to ``image``; None when
    nothing of it is inside the image."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    left, top = max(0, int(np.floor(min(xs)))), max(0, int(np.floor(min(ys))))
    right = min(image.width, int(np.ceil(max(xs))))
    bottom = min(image.height, int(np.ceil(max(ys))))
    if right - left < 1 or bottom - top < 1:
        return None
    return image.crop((left, top, right, bottom))


def warp_crop(image: Image.Image, points: Sequence[tuple[float, float]]) -> Image.Image | None:
    """The quadrilateral ``points`` (clockwise from the top left) rectified by a perspective
    transform to ``(mean of its top and bottom edges) x (mean of its sides)`` pixels; None for
    a degenerate quadrilateral."""
    import cv2

    quad = np.asarray(points, np.float32)
    width = int(round((np.linalg.norm(quad[1] - quad[0]) + np.linalg.norm(quad[2] - quad[3])) / 2))
    height = int(round((np.linalg.norm(quad[3] - quad[0]) + np.linalg.norm(quad[2] - quad[1])) / 2))
    if width < 1 or height < 1:
        return None
    target = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    matrix = cv2.getPerspectiveTransform(quad, target)
    pixels = cv2.warpPerspective(np.asarray(image), matrix, (width, height),
                                 flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(pixels)


def _number(name: str) -> tuple[int, str]:
    """Sort key: the number in ``img_12`` as an int, then the name."""
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)


def crop_words(images: Path, gts: Path, crop: str, counts: Counter
               ) -> Iterator[tuple[bytes, str]]:
    """``(PNG bytes, transcription)`` of every scored region, image by image.

    ``counts`` receives ``images``, ``words`` and the reasons samples were lost.

    Raises:
        ToolchainError: ``gts`` holds no ``gt_*.txt``, or a ground-truth file is malformed.
    """
    cut = box_crop if crop == "box" else warp_crop
    files = sorted((f for f in gts.glob("gt_*.txt")), key=lambda f: _number(f.name))
    if not files:
        raise ToolchainError(f"{gts}: no ICDAR ground-truth file (gt_img_N.txt)")
    for gt in files:
        stem = _GT_NAME.match(gt.name).group(1)
        words: list[GtWord] = [w for w in read_gt_file(gt) if not w.dont_care]
        matches = [p for p in (images / f"{stem}.jpg", images / f"{stem}.png",
                               images / f"{stem}.JPG") if p.is_file()]
        if not matches:
            counts["words lost: no image for the ground truth"] += len(words)
            continue
        try:
            with Image.open(matches[0]) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            counts["words lost: unreadable image"] += len(words)
            counts[f"unreadable image {matches[0].name}: {exc}"] += 1
            continue
        counts["images"] += 1
        for word in words:
            piece = cut(image, word.points)
            if piece is None:
                counts["words lost: no area inside the image"] += 1
                continue
            buffer = io.BytesIO()
            piece.save(buffer, format="PNG")
            counts["words"] += 1
            yield buffer.getvalue(), word.text


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder of img_N.jpg")
    parser.add_argument("--gts", type=Path, required=True, help="folder of gt_img_N.txt")
    parser.add_argument("--out", type=Path, required=True, help="lmdb folder to write (new)")
    parser.add_argument("--crop", choices=CROPS, default="box",
                        help="box: upright bounding rectangle (Task 4.3 style); warp: "
                             "perspective-rectified quadrilateral")
    return parser


def _run(args) -> int:
    for folder, what in ((args.images, "--images"), (args.gts, "--gts")):
        if not folder.is_dir():
            raise ToolchainError(f"{folder}: no such folder ({what})")
    counts: Counter = Counter()
    written = write_word_lmdb(args.out, crop_words(args.images, args.gts, args.crop, counts))
    lost = {k: v for k, v in counts.items() if k not in ("images", "words")}
    print(f"wrote {written} word crops ({args.crop}) from {counts['images']} images to "
          f"{args.out}; lost: {lost or 'none'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
