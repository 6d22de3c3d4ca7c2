"""Choose a DB text detector's resize rule and post-processing settings on a held-out split.

The images (natural order) are split in two: the even-numbered positions are the tuning
half, the odd ones the held-out half. For each resize rule and normalisation the detector's
probability maps are computed once for every image; then every combination of the DB
settings (binarisation threshold, box threshold, unclip ratio, dilation) turns the same maps
into boxes (``models.db_postprocess.boxes_from_map``), scored by ``eval.det_metrics``
(ICDAR 2015 detection protocol). The table lists the best settings of each resize rule on
the tuning half with their H-mean on both halves; the row chosen is the best on the tuning
half, and its held-out H-mean is the number to quote.

Example (docs/results/README.md's detector table):
    python -m bench.det_tune --det ppocr-v6-det --images ../shared/data/IC15_test_even/images \\
        --gts ../shared/data/IC15_test_even/gts
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, positive, run_main
from eval.det_metrics import Detection, score_set
from eval.det_rec import read_ground_truth
from infer import open_model
from infer.onnxruntime_runner import available_cores
from models.db_postprocess import boxes_from_map
from models.det_spec import DetectorSpec
from pipeline.detector import Detector
from pipeline.ocr import DEFAULT_DETECTOR, resolve_model
from preprocess.image import DEFAULT_MAX_PIXELS, detector_input
from preprocess.image_folder import list_images, read_image

#: Resize rules measured: (limit type, limit side).
RULES = (("max", 960), ("min", 736))
#: Normalisations measured: name -> (mean, std).
NORMALISATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
#: DB settings measured on every map.
GRID = {"thresh": (0.2, 0.3), "box_thresh": (0.5, 0.6, 0.7), "unclip_ratio": (1.5, 1.6, 2.0),
        "use_dilation": (False, True)}


def _maps(detector: Detector, images: dict[str, object]) -> dict[str, object]:
    maps = {}
    for name, rgb in images.items():
        batch = detector_input(rgb, detector.spec)[None]
        maps[name] = detector.probability_maps(batch)[0]
    return maps


def _hmean(maps, images, gts, spec: DetectorSpec, names: Sequence[str]) -> float:
    predictions = {}
    for name in names:
        height, width = images[name].shape[:2]
        predictions[name] = [Detection(tuple(map(tuple, box.points)), "")
                             for box in boxes_from_map(maps[name], spec, (width, height))]
    summary, _ = score_set({n: gts[n] for n in names}, predictions)
    return summary["detection"]["hmean"]


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--det", default=DEFAULT_DETECTOR, help="detector file or registry name")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gts", type=Path, required=True)
    parser.add_argument("--limit", type=positive(int), help="only the first N images")
    parser.add_argument("--threads", type=positive(int), default=available_cores())
    return parser


def _main(args) -> int:
    paths = list_images(args.images)[: args.limit]
    gts = read_ground_truth(args.gts, paths)
    images = {p.name: read_image(p, DEFAULT_MAX_PIXELS) for p in paths}
    tuning = [p.name for p in paths[0::2]]
    held_out = [p.name for p in paths[1::2]]
    path, _ = resolve_model(args.det)
    runner, base = open_model(path, expect=DetectorSpec, threads=args.threads)
    rows = []
    with Detector(runner, base) as detector:
        for (limit_type, side), (norm, (mean, std)) in itertools.product(
                RULES, NORMALISATIONS.items()):
            spec = base.replace(limit_type=limit_type, limit_side_len=side, mean=mean, std=std)
            detector.spec = spec
            start = time.perf_counter()
            maps = _maps(detector, images)
            seconds = time.perf_counter() - start
            best = None
            for values in itertools.product(*GRID.values()):
                settings = spec.replace(**dict(zip(GRID, values)))
                score = _hmean(maps, images, gts, settings, tuning)
                if best is None or score > best[0]:
                    best = (score, settings)
            score, settings = best
            rows.append((score, _hmean(maps, images, gts, settings, held_out), settings,
                         norm, len(images) / seconds))
            print(f"{limit_type} {side} {norm}: tuning {score:.4f}", flush=True)
    print(f"\n{args.det}: {len(tuning)} tuning and {len(held_out)} held-out images of "
          f"{args.images}")
    print("| resize | normalisation | thresh | box | unclip | dilation | H tuning | H held-out "
          "| detector images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    chosen = max(rows, key=lambda row: row[0])
    for score, held, s, norm, speed in rows:
        mark = "**" if (score, held) == chosen[:2] and s == chosen[2] else ""
        print(f"| {mark}{s.limit_type} {s.limit_side_len}{mark} | {norm} | {s.thresh} | "
              f"{s.box_thresh} | {s.unclip_ratio} | {s.use_dilation} | {score:.4f} | "
              f"{held:.4f} | {speed:.2f} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
