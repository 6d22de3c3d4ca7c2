"""Full-image OCR over a folder of images, scored on ICDAR 2015 ground truth.

Runs the detector and the recogniser as one pipeline (``pipeline.ocr``): DB text detection,
perspective crops, recognition in equal-width batches, and word boxes cut from line boxes at
the recognised spaces (CTC frame positions). Models are files or registry names whose
weights ``models.weights`` fetches: ``--det ppocr-v6-det`` (default) or ``ppocr-v4-det``,
``--cls ppocr-cls`` (default; the text-direction classifier, ``none`` for none), ``--rec
ppocr-v6-rec`` (default), ``ppocr-v4-rec`` or ``nano-ocr`` (its PyTorch checkpoint), or any
recogniser file the toolchain makes (.onnx, int8 .onnx, .om with its sidecar).

Outputs:
    ``--predictions P.json``: image file name -> ``[{"points": [[x, y] x 4], "text",
    "confidence"}]``, points clockwise in pixels of the original image; an image without
    text gives ``[]``; an image that fails (undecodable, over ``--max-pixels``) is left out
    and listed in the report's ``failures`` (and counted; with ``--gts`` it scores as an
    image with no detections).
    ``--report R.json`` (with ``--gts DIR`` of ICDAR 2015 ``gt_<stem>.txt`` files): detection
    and end-to-end precision, recall and H-mean with their protocols (``eval.det_metrics``),
    per-image rows, the failures, regions dropped by reason, the time and the process's peak
    memory (``peak_rss_mib``). Without ``--gts``
    the report holds everything but the scores.
    ``--vis DIR``: each image as ``<stem>.png`` with its boxes and texts drawn (red), and the
    ground truth (green; don't-care regions grey) where given. DIR must be new, empty, or
    one this tool wrote before (marked by ``.det_rec-output``): nothing else is overwritten.

Examples:
    python -m eval.det_rec --images ../shared/data/IC15_test_even/images \\
        --gts ../shared/data/IC15_test_even/gts --predictions work/p.json --report work/r.json
    python -m eval.det_rec --images photos --predictions p.json --rec nano-ocr --vis vis
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.cli import make_parser, positive, probability, run_main
from common.errors import ToolchainError
from common.memory import peak_rss_mib
from common.outputs import (
    atomic_path,
    check_output_file,
    claim_output_folder,
    json_content,
    write_texts,
)
from eval.det_metrics import Detection, score_set
from eval.postprocess import machine_facts
from infer.device import DEVICE_SPELLINGS
from pipeline.ocr import (
    CLS_THRESHOLD,
    DEFAULT_CLASSIFIER,
    DEFAULT_DETECTOR,
    DEFAULT_RECOGNIZER,
    PRECISIONS,
    ImageResult,
    open_pipeline,
)
from preprocess.icdar_gt import GtWord, read_gt_file
from preprocess.image import DEFAULT_MAX_PIXELS, SampleError
from preprocess.image_folder import read_image, scan_images

log = logging.getLogger(__name__)

def gt_path(gts: Path, image: Path) -> Path:
    """ICDAR 2015's ground-truth file of an image: ``gt_<stem>.txt``."""
    return gts / f"gt_{image.stem}.txt"


def read_ground_truth(gts: Path, images: list[Path]) -> dict[str, list[GtWord]]:
    """Each image's ICDAR 2015 ground truth (``gt_<stem>.txt`` in ``gts``), by file name.

    Raises:
        ToolchainError: ``gts`` is not a folder, some image has no file (names the first
            three), or a file is malformed (``preprocess.icdar_gt.read_gt_file``).
    """
    if not gts.is_dir():
        raise ToolchainError(f"{gts}: not a folder of ground-truth files")
    missing = [gt_path(gts, p).name for p in images if not gt_path(gts, p).is_file()]
    if missing:
        raise ToolchainError(f"{gts}: no ground truth for {len(missing)} images "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return {p.name: read_gt_file(gt_path(gts, p)) for p in images}


def _font(size: int):
    return ImageFont.load_default(size=size)


def draw_result(image: np.ndarray, words, gts: Sequence[GtWord] = ()) -> Image.Image:
    """``image`` with the ground truth (green, don't care grey) and the predicted boxes
    and texts (red) drawn on it."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(12, image.shape[0] // 50)
    font = _font(size)
    for gt in gts:
        colour = (160, 160, 160) if gt.dont_care else (0, 200, 0)
        draw.polygon([tuple(p) for p in gt.points], outline=colour, width=2)
    for word in words:
        points = [tuple(map(float, p)) for p in word.points]
        draw.polygon(points, outline=(255, 0, 0), width=2)
        x, y = min(p[0] for p in points), min(p[1] for p in points)
        anchor_y = max(0.0, y - size - 2)
        box = draw.textbbox((x, anchor_y), word.text, font=font)
        draw.rectangle(box, fill=(255, 255, 255))
        draw.text((x, anchor_y), word.text, fill=(255, 0, 0), font=font)
    return canvas


#: Keys every report.json of this tool has.
_REPORT_KEYS = {"images", "recognised_images", "failures", "dropped_regions", "models"}
#: Keys of every word in predictions.json.
_WORD_KEYS = {"points", "text", "confidence"}


def _written_by_us(path: Path) -> bool:
    """Whether an existing file is a predictions or report JSON this tool wrote (by its shape:
    image name -> list of words with points, text and confidence; or the report's keys)."""
    content = json_content(path)
    if not isinstance(content, dict):
        return False
    if content.keys() >= _REPORT_KEYS:
        return True
    return all(isinstance(words, list)
               and all(isinstance(w, dict) and w.keys() == _WORD_KEYS for w in words)
               for words in content.values())


def check_outputs(args, images: list[Path]) -> None:
    """Refuse outputs that would overwrite an input or each other, a file this tool did not
    write, or a --vis folder with files this tool did not write; create what is needed
    (before any long work).

    Raises:
        ToolchainError: one line naming the output and the problem.
    """
    inputs = {p.resolve() for p in images}
    if args.gts is not None:
        inputs |= {gt_path(args.gts, p).resolve() for p in images}
    files = [("--predictions", args.predictions)]
    if args.report:
        files.append(("--report", args.report))
    for flag, path in files:
        if path.resolve() in inputs:
            raise ToolchainError(f"{path}: is one of the inputs; {flag} must name another file")
        check_output_file(path, flag, ours=_written_by_us, tool="eval.det_rec")
    if args.report and args.report.resolve() == args.predictions.resolve():
        raise ToolchainError(f"{args.report}: --report and --predictions name the same file")
    if args.vis:
        claim_output_folder(args.vis, "det_rec", "--vis")


def add_pipeline_arguments(parser) -> None:
    """The full-image pipeline's options (models, device, threads, pixel cap, confidence,
    word splitting), shared by this tool and ``python -m ocr``; :func:`open_pipeline_of`
    reads them."""
    parser.add_argument("--det", default=DEFAULT_DETECTOR,
                        help="detector file or registry name")
    parser.add_argument("--rec", default=DEFAULT_RECOGNIZER,
                        help="recogniser file or registry name (ppocr-v6-rec, ppocr-v4-rec, "
                             "nano-ocr)")
    parser.add_argument("--cls", default=DEFAULT_CLASSIFIER,
                        help="text-direction classifier file or registry name turning "
                             "upside-down crops; 'none': no classifier")
    parser.add_argument("--cls-thresh", type=probability, default=CLS_THRESHOLD,
                        help="a crop the classifier reads '180' with a higher probability "
                             "is turned 180 degrees")
    parser.add_argument("--cls-no-verify", dest="cls_verify", action="store_false",
                        help="read such a crop turned only, as PaddleOCR does (default: read "
                             "it both ways and keep the more confident reading)")
    parser.add_argument("--precision", choices=PRECISIONS, default="int8",
                        help="int8: registry names with a built int8 copy (python -m "
                             "convert.quantize NAME) use it; fp32: never")
    parser.add_argument("--device", help=f"{DEVICE_SPELLINGS} (default: cpu; npu for .om "
                                         "models)")
    parser.add_argument("--threads", type=positive(int), help="engine threads (default: cores)")
    parser.add_argument("--max-pixels", type=positive(int), default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels fail (checked before decoding)")
    parser.add_argument("--min-confidence", type=probability, default=0.5,
                        help="regions read with a lower recogniser confidence are dropped")
    parser.add_argument("--no-split-words", dest="split_words", action="store_false",
                        help="keep line boxes whole (no cut at recognised spaces)")


def open_pipeline_of(args, **options):
    """``pipeline.ocr.open_pipeline`` for the options :func:`add_pipeline_arguments` added
    (and ``options``: more of its arguments)."""
    return open_pipeline(args.det, args.rec, args.device, threads=args.threads,
                         classifier=None if args.cls == "none" else args.cls,
                         cls_threshold=args.cls_thresh, cls_verify=args.cls_verify,
                         split_words=args.split_words, min_confidence=args.min_confidence,
                         precision=args.precision, **options)


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--predictions", type=Path, required=True, help="output JSON")
    parser.add_argument("--gts", type=Path, help="folder of ICDAR 2015 gt_<stem>.txt files")
    parser.add_argument("--report", type=Path, help="report JSON")
    parser.add_argument("--vis", type=Path, help="folder for the drawn images (PNG)")
    add_pipeline_arguments(parser)
    parser.add_argument("--rec-batch-size", type=positive(int), default=16)
    parser.add_argument("--group", type=positive(int), default=16,
                        help="images per pipeline call (their crops share recogniser batches)")
    db = parser.add_argument_group("detector settings (default: the model's description)")
    db.add_argument("--limit-type", choices=("max", "min"))
    db.add_argument("--limit-side-len", type=positive(int))
    db.add_argument("--thresh", type=float, help="binarisation threshold")
    db.add_argument("--box-thresh", type=float, help="minimum box score")
    db.add_argument("--unclip-ratio", type=positive(float))
    db.add_argument("--use-dilation", action="store_true", default=None)
    parser.add_argument("--limit", type=positive(int), help="only the first N images")
    return parser


_DB_FIELDS = ("limit_type", "limit_side_len", "thresh", "box_thresh", "unclip_ratio",
              "use_dilation")


def run(args) -> dict[str, object]:
    """Run the pipeline over ``args.images`` and write the outputs; return the report."""
    images, skipped = scan_images(args.images)
    images = images[: args.limit]
    for entry in skipped:
        log.warning("%s: %s", args.images / entry["image"], entry["reason"])
    gts = read_ground_truth(args.gts, images) if args.gts is not None else None
    check_outputs(args, images)
    changes = {k: getattr(args, k) for k in _DB_FIELDS if getattr(args, k) is not None}
    pipeline = open_pipeline_of(args, detector_changes=changes,
                                rec_batch_size=args.rec_batch_size)
    predictions: dict[str, list] = {}
    results: dict[str, ImageResult] = {}
    failures: list[dict[str, str]] = list(skipped)  # counted, never scored
    with pipeline:
        warm = np.full((64, 64, 3), 255, np.uint8)
        pipeline([warm])  # loads lazily-initialised kernels; not timed
        pipeline.detector.engine_seconds = pipeline.recognise_seconds = 0.0
        pipeline.classify_seconds = 0.0
        start = time.perf_counter()
        # Images go through in groups (the crops of a group share the recogniser's
        # equal-width batches); the next group is read and decoded on a thread meanwhile.
        groups = [images[i:i + args.group] for i in range(0, len(images), args.group)]
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as reader, \
                _progress(len(images)) as bar:
            pending = reader.submit(_read_group, groups[0], args.max_pixels) if groups else None
            for index in range(len(groups)):
                decoded = pending.result()
                if index + 1 < len(groups):
                    pending = reader.submit(_read_group, groups[index + 1], args.max_pixels)
                ok = [(path, pixels) for path, pixels in decoded if not isinstance(pixels, str)]
                for path, reason in decoded:
                    if isinstance(reason, str):
                        failures.append({"image": path.name, "reason": reason})
                        log.warning("%s: %s", path, reason)
                group_results = pipeline([pixels for _, pixels in ok]) if ok else []
                for (path, pixels), result in zip(ok, group_results):
                    results[path.name] = result
                    predictions[path.name] = [w.as_json() for w in result.words]
                    if args.vis:
                        drawn = draw_result(pixels, result.words, gts[path.name] if gts else ())
                        with atomic_path(args.vis / f"{path.stem}.png") as target:
                            drawn.save(target, format="PNG")
                bar.update(len(decoded))
        seconds = time.perf_counter() - start
    dropped: dict[str, int] = {}
    for result in results.values():
        for reason, count in result.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    report: dict[str, object] = {
        "images": len(images) + len(skipped),
        "recognised_images": len(results),
        "failed": len(failures),
        "failures": failures,
        "words": sum(len(r.words) for r in results.values()),
        "dropped_regions": dropped,
        "seconds": seconds,
        "images_per_second": len(images) / seconds if seconds else 0.0,
        "time_split": {"detector_engine": pipeline.detector.engine_seconds,
                       "direction_classifier": pipeline.classify_seconds,
                       "recogniser": pipeline.recognise_seconds},
        "models": {"detector": str(args.det), "recogniser": str(args.rec),
                   "precision": args.precision,
                   "classifier": None if args.cls == "none" else str(args.cls),
                   "cls_threshold": args.cls_thresh, "cls_verify": args.cls_verify,
                   "detector_settings": pipeline.detector.spec.to_dict(),
                   "split_words": args.split_words, "min_confidence": args.min_confidence},
        "machine": machine_facts(),
        "peak_rss_mib": peak_rss_mib(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if gts is not None:
        detections = {name: [Detection(tuple(map(tuple, w["points"])), w["text"],
                                       w["confidence"]) for w in words]
                      for name, words in predictions.items()}
        summary, rows = score_set(gts, detections)
        report.update(summary)
        report["per_image"] = [{"image": name, **counts.as_dict(),
                                "dropped": results[name].dropped if name in results else {},
                                "failed": name not in results}
                               for name, counts in rows.items()]
    texts = {args.predictions: json.dumps(predictions, ensure_ascii=False, indent=1)}
    if args.report:
        texts[args.report] = json.dumps(report, ensure_ascii=False, indent=1)
    write_texts(texts)
    return report


def _read_group(paths: list[Path], max_pixels: int) -> list[tuple[Path, np.ndarray | str]]:
    """Each path with its pixels, or the reason it cannot be read (a string)."""
    out: list[tuple[Path, np.ndarray | str]] = []
    for path in paths:
        try:
            out.append((path, read_image(path, max_pixels)))
        except SampleError as exc:
            out.append((path, str(exc)))
    return out


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", leave=False, disable=None)


def _run(args) -> int:
    report = run(args)
    print(f"{report['recognised_images']} of {report['images']} images, {report['failed']} "
          f"failed, {report['words']} words, {report['images_per_second']:.2f} images/s")
    for key in ("detection", "end_to_end"):
        if key in report:
            scores = report[key]
            print(f"{key}: precision {scores['precision']:.4f} recall {scores['recall']:.4f} "
                  f"H-mean {scores['hmean']:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
