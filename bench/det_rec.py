"""Benchmark: our full-image OCR pipeline against RapidOCR 1.4.4 (its defaults), side by side.

In one run, on the same images, one after the other (never at once):
    1. RapidOCR (``rapidocr-onnxruntime==1.4.4``, its ``config.yaml`` defaults: PP-OCRv4
       detector at shortest side 736, direction classifier, PP-OCRv4 recogniser) in its own
       virtual environment (made on first use in ``--rapidocr-venv``; RapidOCR is never a
       dependency of this project), through ``bench/rapidocr_run.py``;
    2. ``python -m eval.det_rec`` with its defaults;
    3. the same with ``--no-split-words`` (what word boxes from the CTC alignment add);
    4. with ``--nano`` also ``--rec nano-ocr`` (the alternative recogniser).
Each runs in its own process; time is the loop over the images (reading, decoding and
recognising each), model loading and one warm-up excluded on both sides. All predictions are
scored by the same code (``eval.det_metrics``, ICDAR 2015 protocols).

Example:
    python -m bench.det_rec --images ../shared/data/IC15_test_even/images \\
        --gts ../shared/data/IC15_test_even/gts
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common.cli import REPO_ROOT, make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import claim_output_folder
from eval.det_metrics import Detection, score_set
from eval.det_rec import list_images, read_ground_truth

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
DEFAULT_VENV = REPO_ROOT / ".cache" / "bench-rapidocr"


def rapidocr_python(venv: Path) -> Path:
    """The Python of a virtual environment with RapidOCR, made (and installed) if missing.

    Raises:
        ToolchainError: the environment cannot be made or RapidOCR cannot be installed.
    """
    python = venv / "bin" / "python"
    if python.is_file():
        probe = subprocess.run([str(python), "-c", "import rapidocr_onnxruntime"],
                               capture_output=True)
        if probe.returncode == 0:
            return python
    for step in ([sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", RAPIDOCR]):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise ToolchainError(f"{' '.join(step[:4])} failed: {tail}")
    return python


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
    parser.add_argument("--rapidocr-venv", type=Path, default=DEFAULT_VENV,
                        help="virtual environment for RapidOCR (made if missing)")
    parser.add_argument("--limit", type=positive(int), help="only the first N images")
    parser.add_argument("--out", type=Path, help="folder to keep the predictions and reports "
                                                  "(new, empty, or this bench's own)")
    parser.add_argument("--nano", action="store_true", help="also run with --rec nano-ocr")
    return parser


def _main(args) -> int:
    images = list_images(args.images)[: args.limit]
    gts = read_ground_truth(args.gts, images)
    if args.out:
        claim_output_folder(args.out, "bench.det_rec", "--out")
    python = rapidocr_python(args.rapidocr_venv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        folder = args.images
        if args.limit:  # both sides read the same subset
            folder = work / "images"
            folder.mkdir(exist_ok=True)
            for path in images:
                target = folder / path.name
                if not target.exists():
                    target.symlink_to(path.resolve())
        rows = []
        _run([str(python), str(REPO_ROOT / "bench" / "rapidocr_run.py"), "--images",
              str(folder), "--out", str(work / "rapidocr.json")])
        rapid = json.loads((work / "rapidocr.json").read_text())
        rows.append(("RapidOCR 1.4.4 (defaults)", rapid["predictions"],
                     rapid["images"] / rapid["seconds"]))
        ours = [("ours (eval.det_rec defaults)", "ours", []),
                ("ours, --no-split-words", "ours_nosplit", ["--no-split-words"])]
        if args.nano:
            ours.append(("ours, --rec nano-ocr", "ours_nano", ["--rec", "nano-ocr"]))
        for label, stem, extra in ours:
            _run([sys.executable, "-m", "eval.det_rec", "--images", str(folder), "--predictions",
                  str(work / f"{stem}.json"), "--report", str(work / f"{stem}_report.json"),
                  *extra])
            report = json.loads((work / f"{stem}_report.json").read_text())
            rows.append((label, json.loads((work / f"{stem}.json").read_text()),
                         report["images_per_second"]))
    base_speed = rows[0][2]
    print(f"{len(images)} images of {args.images}, one process at a time")
    print("| pipeline | det P | det R | det H | e2e P | e2e R | e2e H | images/s | x RapidOCR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, predictions, speed in rows:
        det, e2e = score(predictions, gts)
        print(f"| {label} | {det['precision']:.3f} | {det['recall']:.3f} | {det['hmean']:.3f} | "
              f"{e2e['precision']:.3f} | {e2e['recall']:.3f} | {e2e['hmean']:.3f} | "
              f"{speed:.2f} | {speed / base_speed:.2f} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
