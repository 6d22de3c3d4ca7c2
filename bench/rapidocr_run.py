"""Run RapidOCR (3.10.0 or 1.4.4, its defaults) over a folder of images.

This script runs in a benchmark environment where RapidOCR is installed (``bench.det_rec``
makes one per version); it imports nothing from this project, so the project never depends
on RapidOCR. It writes the predictions in ``eval.det_rec``'s format (file name -> ``[{"points",
"text", "confidence"}]``) and the seconds spent, as one JSON object: ``{"predictions": {...},
"seconds": float, "images": int}``.

``--package rapidocr`` (3.x): ``RapidOCR()(path)``; with ``--word-box``,
``return_word_box=True`` and each word of ``word_results`` is one prediction with its own
box. ``--package rapidocr_onnxruntime`` (1.4.4): ``RapidOCR()(path)``, one prediction per
line.

Usage (inside that environment):
    python bench/rapidocr_run.py --package rapidocr --images DIR --out OUT.json [--word-box]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _points(box) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in box]


def predictions_v3(engine, path: Path, word_box: bool) -> list[dict]:
    """RapidOCR 3.x: lines (``boxes``, ``txts``, ``scores``), or with ``word_box`` the words
    of ``word_results`` (``(text, score, box)`` per word, per line)."""
    if word_box:
        result = engine(str(path), return_word_box=True)
        if result.txts is None:
            return []
        return [{"points": _points(box), "text": text, "confidence": float(score)}
                for line in result.word_results for text, score, box in line
                if box is not None and text.strip()]
    result = engine(str(path))
    if result.txts is None:
        return []
    return [{"points": _points(box), "text": text, "confidence": float(score)}
            for box, text, score in zip(result.boxes, result.txts, result.scores)]


def predictions_v1(engine, path: Path) -> list[dict]:
    """RapidOCR 1.4.4: ``(result, elapse)``, result None when no text was found."""
    result, _ = engine(str(path))
    if result is None:
        return []
    return [{"points": _points(box), "text": text, "confidence": float(score)}
            for box, text, score in result]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", choices=("rapidocr", "rapidocr_onnxruntime"),
                        default="rapidocr_onnxruntime")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--word-box", action="store_true", help="3.x: return_word_box=True")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()

    engine = importlib.import_module(args.package).RapidOCR()  # config.yaml defaults
    names = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit:
        names = names[: args.limit]

    def run(name: str) -> list[dict]:
        if args.package == "rapidocr":
            return predictions_v3(engine, args.images / name, args.word_box)
        return predictions_v1(engine, args.images / name)

    run(names[0])  # warm-up, not timed
    start = time.perf_counter()
    predictions = {name: run(name) for name in names}
    seconds = time.perf_counter() - start
    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps({"predictions": predictions, "seconds": seconds,
                                   "images": len(names)}))
    partial.replace(args.out)
    print(f"{args.package}: {len(names)} images in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
