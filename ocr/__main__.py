"""Read the text of photos in one call: detection, direction, recognition, word boxes.

Prints each image's lines (the detector's regions, in its order) and their words with boxes
and confidences, as RapidOCR's ``rapidocr IMAGE`` does; ``--json`` prints one JSON object
per image instead (``{"image", "lines": [{"points", "text", "confidence", "words":
[{"points", "text", "confidence"}]}], "dropped"}``, points clockwise from the text's
top-left, in pixels). PHOTO may be a file, a folder (its images, in natural order) or a
glob pattern (quote it). Models default to PP-OCRv6's detector and recogniser with the
text-direction classifier (fetched on first use); any model ``eval.det_rec`` takes works.
An image that cannot be read is reported on stderr and counted, the others are still read;
the exit code is 1 when any failed.

Examples:
    python -m ocr photo.jpg
    python -m ocr ../shared/data/IC15_test_even/images/img_2.jpg --json
    python -m ocr "photos/*.jpg" --rec ppocr-v4-rec --cls none
"""

from __future__ import annotations

import glob
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from eval.det_rec import add_pipeline_arguments, open_pipeline_of
from pipeline.ocr import ImageResult
from preprocess.image import SampleError
from preprocess.image_folder import IMAGE_SUFFIXES, list_images, read_image

log = logging.getLogger("ocr")


def expand(photos: Sequence[str]) -> list[Path]:
    """The image files named by ``photos``: files, folders' images, glob matches (in order,
    each once).

    Raises:
        ToolchainError: an argument names nothing (no file, folder or glob match).
    """
    found: list[Path] = []
    for photo in photos:
        path = Path(photo)
        if path.is_dir():
            found += list_images(path)
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(photo, recursive=True)
                             if Path(m).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise ToolchainError(f"{photo}: no such file or folder, and no image matches it "
                                     "as a pattern")
            found += matches
    return list(dict.fromkeys(found))


def as_text(name: str, result: ImageResult) -> str:
    """One image's result as lines of text: a header, then each line and its words."""
    out = [f"{name}: {len(result.lines)} lines, {len(result.words)} words"
           + (f" ({', '.join(f'{n} {r}' for r, n in result.dropped.items())} dropped)"
              if result.dropped else "")]
    for line in result.lines:
        box = " ".join(f"{x:.0f},{y:.0f}" for x, y in line.points)
        turned = " (turned 180)" if line.upside_down else ""
        out.append(f"  {line.confidence:.3f}  {line.text}  [{box}]{turned}")
        if len(line.words) > 1:
            for index in line.words:
                word = result.words[index]
                corners = " ".join(f"{x:.0f},{y:.0f}" for x, y in word.points)
                out.append(f"      {word.text}  [{corners}]")
    return "\n".join(out)


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="image file, folder or glob")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    add_pipeline_arguments(parser)
    return parser


def _run(args) -> int:
    paths = expand(args.photos)
    pipeline = open_pipeline_of(args)
    failed = 0
    with pipeline:
        for path in paths:
            try:
                pixels = read_image(path, args.max_pixels)
            except SampleError as exc:
                failed += 1
                print(f"error: {path}: {exc}", file=sys.stderr)
                continue
            (result,) = pipeline([pixels])
            if args.json:
                print(json.dumps({"image": str(path),
                                  "lines": [line.as_json(result.words) for line in result.lines],
                                  "dropped": result.dropped}, ensure_ascii=False), flush=True)
            else:
                print(as_text(str(path), result), flush=True)
    if failed:
        print(f"{failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
