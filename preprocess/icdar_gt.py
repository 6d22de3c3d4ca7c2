"""ICDAR 2015 ground truth: one ``gt_img_N.txt`` per image, one word region per line.

Format (Robust Reading Competition, Incidental Scene Text): ``x1,y1,x2,y2,x3,y3,x4,y4,
transcription``, a clockwise quadrilateral in pixels, UTF-8 (often with a byte-order mark);
the transcription may itself contain commas, and ``###`` marks a region that is not scored.
Read here for the scorer (``eval.det_metrics``) and for cutting word crops
(``preprocess.icdar_crops``); written here for a set turned upside down (``bench.det_rec
--turned``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.errors import ToolchainError

DONT_CARE_TEXT = "###"


@dataclass(frozen=True)
class GtWord:
    """One ground-truth region: ``points`` four ``(x, y)`` pixels, clockwise; ``text`` its word."""

    points: tuple[tuple[float, float], ...]
    text: str

    @property
    def dont_care(self) -> bool:
        """Whether the region is not scored (transcribed ``###``)."""
        return self.text == DONT_CARE_TEXT


def read_gt_file(path: str | Path) -> list[GtWord]:
    """The words of an ICDAR 2015 ground-truth file (``x1,y1,...,x4,y4,transcription``).

    UTF-8 with or without a byte-order mark; the transcription may contain commas.

    Raises:
        ToolchainError: unreadable file, or a line without 8 finite numbers and a
            transcription (names the file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"{path}: unreadable ground truth ({exc})") from None
    words = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(",", 8)
        try:
            if len(fields) != 9:
                raise ValueError("need 8 coordinates and a transcription")
            coords = [float(v) for v in fields[:8]]
            if not all(math.isfinite(c) for c in coords):
                raise ValueError("a coordinate is not a finite number (nan or inf)")
        except ValueError as exc:
            raise ToolchainError(f"{path}:{number}: not an ICDAR 2015 line ({exc})") from None
        points = tuple((coords[i], coords[i + 1]) for i in range(0, 8, 2))
        words.append(GtWord(points, fields[8]))
    return words


def format_gt(words: list[GtWord]) -> str:
    """The text of an ICDAR 2015 ground-truth file for ``words`` (inverse of
    :func:`read_gt_file`; coordinates written as integers when they are whole)."""

    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    return "".join(",".join([*(number(v) for point in word.points for v in point), word.text])
                   + "\n" for word in words)


def turned_upside_down(words: list[GtWord], width: int, height: int) -> list[GtWord]:
    """The ground truth of an image of ``width`` x ``height`` pixels turned 180 degrees:
    ``(x, y) -> (width - x, height - y)``, each region still clockwise from its text's
    top-left."""
    return [GtWord(tuple((width - x, height - y) for x, y in (*w.points[2:], *w.points[:2])),
                   w.text) for w in words]
