"""Run RapidOCR (rapidocr-onnxruntime 1.4.4, its defaults) over a folder of images.

This script runs in the benchmark's own environment, where ``rapidocr-onnxruntime`` is
installed (``bench.det_rec`` makes it); it imports nothing from this project, so the project
never depends on RapidOCR. It writes the predictions in ``eval.det_rec``'s format (file name
-> ``[{"points", "text", "confidence"}]``) and the seconds spent, as one JSON object:
``{"predictions": {...}, "seconds": float, "images": int}``.

Usage (inside that environment):
    python bench/rapidocr_run.py --images DIR --out OUT.json [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()

    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()  # the package's config.yaml defaults
    names = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit:
        names = names[: args.limit]
    engine(str(args.images / names[0]))  # warm-up, not timed
    predictions = {}
    start = time.perf_counter()
    for name in names:
        result, _ = engine(str(args.images / name))
        if result is None:  # RapidOCR's answer for "no text found"
            predictions[name] = []
            continue
        predictions[name] = [
            {"points": [[float(x), float(y)] for x, y in box], "text": text,
             "confidence": float(score)}
            for box, text, score in result
        ]
    seconds = time.perf_counter() - start
    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps({"predictions": predictions, "seconds": seconds,
                                   "images": len(names)}))
    partial.replace(args.out)
    print(f"rapidocr: {len(names)} images in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
