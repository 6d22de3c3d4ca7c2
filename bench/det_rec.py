"""Benchmark: our full-image OCR pipeline against RapidOCR 3.10.0 and 1.4.4, side by side.

In one run, on the same images, one after the other (never at once):
    1. RapidOCR 3.10.0 (``rapidocr==3.10.0`` with ONNX Runtime, its ``config.yaml`` defaults:
       PP-OCRv6 small detector at shortest side 736, direction classifier, PP-OCRv6 small
       recogniser), with line boxes and with ``return_word_box=True`` (word boxes);
    2. RapidOCR 1.4.4 (``rapidocr-onnxruntime==1.4.4``, its defaults: PP-OCRv4);
    each in its own virtual environment (made on first use under ``--venvs``; RapidOCR is
    never a dependency of this project), through ``bench/rapidocr_run.py``;
    3. ``python -m eval.det_rec`` with its defaults (PP-OCRv6 det and rec, the direction
       classifier, word boxes from the CTC alignment);
    4. the same with ``--cls none``, with ``--no-split-words``, and with the detector at
       shortest side 736 (RapidOCR's resize rule);
    5. with ``--v4`` also PP-OCRv4 det and rec, and with ``--nano`` ``--rec nano-ocr``;
    6. with ``--served``, every image posted to a real ``python -m serve --det`` (/ocr),
       its answer compared with the offline predictions of step 3;
    7. with ``--int8`` int8 copies of PP-OCRv6's detector (``convert.quantize``, calibrated
       on the first 50 images) and recogniser (calibrated on ``$IIIT5K_CALIB_LMDB``), built
       before the timings: ours with both int8, with the detector int8 only and with the
       recogniser int8 only, each beside the fp32 defaults with its detector engine time and
       peak memory, and scored again on the images after the first 50 (held out from the
       detector's calibration);
    8. with ``--turned`` the set turned 180 degrees (images and ground truth, written into the
       work folder): ours with the direction classifier
       (the recogniser verifying its turns, the default), with ``--cls-no-verify``
       (PaddleOCR's rule) and with ``--cls none``.
Each runs in its own process; time is the loop over the images (reading, decoding and
recognising each), model loading and one warm-up excluded on every side. All predictions
are scored by the same code (``eval.det_metrics``, ICDAR 2015 protocols); speed is given as a
ratio to RapidOCR 3.10.0 with word boxes, measured in the same run.

Example:
    python -m bench.det_rec --images ../shared/data/IC15_test_even/images \\
        --gts ../shared/data/IC15_test_even/gts --turned --v4
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from common.cli import REPO_ROOT, make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import claim_output_folder
from eval.det_metrics import Detection, score_set
from eval.det_rec import gt_path, read_ground_truth
from preprocess.icdar_gt import format_gt, read_gt_file, turned_upside_down
from preprocess.image import DEFAULT_MAX_PIXELS
from preprocess.image_folder import list_images
from preprocess.lmdb_reader import default_calibration_set

#: The RapidOCR versions measured: name -> (its virtual environment's folder, the pip
#: requirements, the package to import). ONNX Runtime is the project's own version.
RAPIDOCR = {
    "3.10.0": ("rapidocr-3.10.0", ["rapidocr==3.10.0", "onnxruntime==1.31.1"], "rapidocr"),
    "1.4.4": ("rapidocr-1.4.4", ["rapidocr-onnxruntime==1.4.4"], "rapidocr_onnxruntime"),
}
DEFAULT_VENVS = REPO_ROOT / ".cache" / "bench-venvs"


def rapidocr_python(venvs: Path, version: str) -> Path:
    """The Python of a virtual environment with RapidOCR ``version``, made (and installed)
    if missing.

    Raises:
        ToolchainError: the environment cannot be made or RapidOCR cannot be installed.
    """
    folder, requirements, package = RAPIDOCR[version]
    venv = venvs / folder
    python = venv / "bin" / "python"
    if python.is_file():
        probe = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True)
        if probe.returncode == 0:
            return python
    for step in ([sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", *requirements]):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise ToolchainError(f"{' '.join(step[:4])} failed: {tail}")
    return python


def turned_copy(images: list[Path], gts: Path, folder: Path) -> tuple[Path, Path]:
    """The set turned 180 degrees under ``folder``: ``images/`` (PNG, lossless) and
    ``gts/`` (``preprocess.icdar_gt.turned_upside_down``); made once, reused after."""
    turned_images, turned_gts = folder / "images", folder / "gts"
    turned_images.mkdir(parents=True, exist_ok=True)
    turned_gts.mkdir(exist_ok=True)
    for path in images:
        target = turned_images / f"{path.stem}.png"
        gt_target = gt_path(turned_gts, target)
        if target.exists() and gt_target.exists():
            continue
        with Image.open(path) as image:
            rotated = image.convert("RGB").transpose(Image.Transpose.ROTATE_180)
            width, height = image.size
        rotated.save(target, format="PNG")
        words = read_gt_file(gt_path(gts, path))
        gt_target.write_text(format_gt(turned_upside_down(words, width, height)),
                             encoding="utf-8")
    return turned_images, turned_gts


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ToolchainError(f"{' '.join(command[:4])} ... failed ({done.returncode}): {tail}")


def score(predictions: dict, gts: dict) -> tuple[dict, dict]:
    detections = {name: [Detection(tuple(map(tuple, w["points"])), w["text"]) for w in words]
                  for name, words in predictions.items()}
    summary, _ = score_set(gts, detections)
    return summary["detection"], summary["end_to_end"]


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gts", type=Path, required=True)
    parser.add_argument("--venvs", type=Path, default=DEFAULT_VENVS,
                        help="folder of RapidOCR's virtual environments (made if missing)")
    parser.add_argument("--limit", type=positive(int), help="only the first N images")
    parser.add_argument("--out", type=Path, help="folder to keep the predictions and reports "
                                                  "(new, empty, or this bench's own)")
    parser.add_argument("--turned", action="store_true",
                        help="also the set turned 180 degrees (the direction classifier)")
    parser.add_argument("--v4", action="store_true", help="also PP-OCRv4 det and rec")
    parser.add_argument("--nano", action="store_true", help="also with --rec nano-ocr")
    parser.add_argument("--served", action="store_true",
                        help="also post every image to a real `python -m serve --det` and "
                             "count the answers equal to the offline predictions")
    parser.add_argument("--int8", action="store_true",
                        help="also with int8 copies of the PP-OCRv6 detector and recogniser")
    parser.add_argument("--calibration", type=Path, default=default_calibration_set(),
                        help="lmdb the int8 recogniser is calibrated on ($IIIT5K_CALIB_LMDB)")
    parser.add_argument("--no-rapidocr", dest="rapidocr", action="store_false",
                        help="our pipeline only (no RapidOCR rows, no speed ratio)")
    return parser


#: The int8 detector is calibrated on this many of the first images (``--int8``); the
#: held-out rows score the others.
INT8_CALIBRATION_IMAGES = 50


def build_int8(photos: Path, calibration: Path, work: Path) -> tuple[Path, Path]:
    """int8 copies of PP-OCRv6's detector (calibrated on the first
    :data:`INT8_CALIBRATION_IMAGES` of ``photos``) and recogniser (on the lmdb
    ``calibration``), each by ``python -m convert.quantize`` with its recipe.

    Returns:
        (int8 detector, int8 recogniser) in ``work``.
    """
    from models.weights import fetch

    det, rec = work / "ppocr_v6_det_int8.onnx", work / "ppocr_v6_rec_int8.onnx"
    _run([sys.executable, "-m", "convert.quantize", str(fetch("ppocr-v6-det")), str(det),
          "--calibration", str(photos), "--samples", str(INT8_CALIBRATION_IMAGES)])
    _run([sys.executable, "-m", "convert.quantize", str(fetch("ppocr-v6-rec")), str(rec),
          "--calibration", str(calibration)])
    return det, rec


def _ours(folder: Path, work: Path, stem: str, extra: list[str]) -> tuple[dict, float, dict]:
    _run([sys.executable, "-m", "eval.det_rec", "--images", str(folder), "--predictions",
          str(work / f"{stem}.json"), "--report", str(work / f"{stem}_report.json"), *extra])
    report = json.loads((work / f"{stem}_report.json").read_text())
    return (json.loads((work / f"{stem}.json").read_text()), report["images_per_second"],
            report)


def _rapidocr(args, version: str, folder: Path, work: Path, stem: str,
              word_box: bool = False) -> tuple[dict, float, None]:
    python = rapidocr_python(args.venvs, version)
    _run([str(python), str(REPO_ROOT / "bench" / "rapidocr_run.py"), "--package",
          RAPIDOCR[version][2], "--images", str(folder), "--out", str(work / f"{stem}.json"),
          *(["--word-box"] if word_box else [])])
    rapid = json.loads((work / f"{stem}.json").read_text())
    return rapid["predictions"], rapid["images"] / rapid["seconds"], None


def served_equal(folder: Path, offline: dict[str, list]) -> int:
    """Post every image of ``folder`` to ``POST /ocr`` of a real server with the default
    models (``python -m serve --det``, 4 clients at once) and count the answers whose words
    equal the offline pipeline's predictions ``offline``; print the count and the first
    differing images; return how many differ."""
    import httpx

    from serve.process import ServerProcess

    names = sorted(offline)
    with ServerProcess(["--det", "--max-pixels", str(DEFAULT_MAX_PIXELS)], ready_timeout=300) \
            as server, httpx.Client(base_url=server.url, timeout=120) as client, \
            ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(
            lambda name: client.post("/ocr", content=(folder / name).read_bytes()), names))
    differ = [name for name, answer in zip(names, answers)
              if answer.status_code != 200 or answer.json()["words"] != offline[name]]
    print(f"served /ocr equals offline on {len(names) - len(differ)} of {len(names)} images"
          + (f"; differ: {', '.join(differ[:5])}" if differ else ""))
    return len(differ)


def _main(args) -> int:
    images = list_images(args.images)[: args.limit]
    gts = read_ground_truth(args.gts, images)
    if args.out:
        claim_output_folder(args.out, "bench.det_rec", "--out")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        folder = args.images
        if args.limit:  # every side reads the same subset
            folder = work / "images"
            folder.mkdir(exist_ok=True)
            for path in images:
                target = folder / path.name
                if not target.exists():
                    target.symlink_to(path.resolve())
        sets = [("IC15", folder, gts)]
        if args.turned:
            turned_images, turned_gts = turned_copy(images, args.gts, work / "turned")
            turned_list = list_images(turned_images)
            sets.append(("turned 180", turned_images,
                         read_ground_truth(turned_gts, turned_list)))
        int8 = build_int8(folder, args.calibration, work) if args.int8 else None
        rows = []  # (set, label, predictions, images/s, our report or None)
        for name, images_folder, _ in sets:
            tag = "" if name == "IC15" else "turned_"
            if args.rapidocr and name == "IC15":
                rows.append((name, "RapidOCR 3.10.0, word boxes", *_rapidocr(
                    args, "3.10.0", images_folder, work, "rapid3_words", True)))
                rows.append((name, "RapidOCR 3.10.0 (defaults)", *_rapidocr(
                    args, "3.10.0", images_folder, work, "rapid3")))
                rows.append((name, "RapidOCR 1.4.4 (defaults)", *_rapidocr(
                    args, "1.4.4", images_folder, work, "rapid1")))
            ours = [("ours (defaults: PP-OCRv6, direction classifier)", "ours", []),
                    ("ours, --cls none", "ours_nocls", ["--cls", "none"])]
            if name == "IC15":
                ours.append(("ours, --no-split-words", "ours_nosplit", ["--no-split-words"]))
                ours.append(("ours, detector at shortest side 736 (RapidOCR's rule)", "ours_736",
                             ["--limit-type", "min", "--limit-side-len", "736"]))
                if args.v4:
                    ours.append(("ours, PP-OCRv4 det and rec", "ours_v4",
                                 ["--det", "ppocr-v4-det", "--rec", "ppocr-v4-rec"]))
                if args.nano:
                    ours.append(("ours, --rec nano-ocr", "ours_nano", ["--rec", "nano-ocr"]))
                if int8 is not None:
                    det8, rec8 = (str(path) for path in int8)
                    ours.append(("ours, int8 detector and recogniser", "ours_int8",
                                 ["--det", det8, "--rec", rec8]))
                    ours.append(("ours, int8 detector", "ours_int8_det", ["--det", det8]))
                    ours.append(("ours, int8 recogniser", "ours_int8_rec", ["--rec", rec8]))
            else:
                ours.insert(1, ("ours, --cls-no-verify (PaddleOCR's rule)", "ours_noverify",
                                ["--cls-no-verify"]))
            for label, stem, extra in ours:
                rows.append((name, label, *_ours(images_folder, work, tag + stem, extra)))
        if args.served:
            served_equal(folder, json.loads((work / "ours.json").read_text()))
    base = next((speed for _, label, _, speed, _ in rows if label.endswith("word boxes")), None)
    print(f"{len(images)} images of {args.images}, one process at a time")
    print("| set | pipeline | det P | det R | det H | e2e P | e2e R | e2e H | images/s "
          "| x RapidOCR 3.10 word boxes | detector engine s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    truths = {name: truth for name, _, truth in sets}
    for name, label, predictions, speed, report in rows:
        det, e2e = score(predictions, truths[name])
        ratio = f"{speed / base:.2f}" if base else "-"
        engine = f"{report['time_split']['detector_engine']:.1f}" if report else "-"
        memory = f"{report['peak_rss_mib']:.0f}" if report else "-"
        print(f"| {name} | {label} | {det['precision']:.3f} | {det['recall']:.3f} | "
              f"{det['hmean']:.3f} | {e2e['precision']:.3f} | {e2e['recall']:.3f} | "
              f"{e2e['hmean']:.3f} | {speed:.2f} | {ratio} | {engine} | {memory} |")
    if int8 is not None and len(images) > INT8_CALIBRATION_IMAGES:
        held_out = {p.name for p in images[INT8_CALIBRATION_IMAGES:]}
        truth = {n: t for n, t in truths["IC15"].items() if n in held_out}
        print(f"\nheld out from the int8 detector's calibration: the {len(held_out)} images "
              f"after the first {INT8_CALIBRATION_IMAGES}")
        print("| pipeline | det H | e2e H |")
        print("| --- | --- | --- |")
        for name, label, predictions, _, _ in rows:
            if name == "IC15" and label.startswith("ours") and ("int8" in label
                                                                or "defaults" in label):
                det, e2e = score({n: p for n, p in predictions.items() if n in held_out},
                                 truth)
                print(f"| {label} | {det['hmean']:.3f} | {e2e['hmean']:.3f} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
