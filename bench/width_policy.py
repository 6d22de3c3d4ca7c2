"""Measure width policies on a test set: accuracy, mean input width and engine time.

For each policy (fixed width, and keep-ratio with several clamps and rounding steps) the
set is preprocessed with ``preprocess.parse_testdata`` (bucketed, equal-width batches) and
evaluated with ``eval`` through the model's runner, all in this process, so the rows are
comparable. The policies measured depend on the model's input height (32 px: crnn and
nano-ocr; 48 px: PP-OCR). The table is printed as Markdown (paste it into docs/results/README.md).

Example (docs/results/README.md's tables):
    python -m bench.width_policy --model work/nano_fixed.onnx
    python -m bench.width_policy --model "$(python -m models.weights path ppocr-v4-rec)"
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from eval.evaluate import run_evaluation
from eval.inputs import load_input_set
from eval.metrics import recognition_metrics
from infer import describe, open_model
from infer.onnxruntime_runner import available_cores
from pipeline import Recognizer
from preprocess.lmdb_reader import default_test_set
from preprocess.parse_testdata import write_inputs


def _keep(low: int, high: int, step: int = 1) -> tuple[str, dict]:
    label = f"keep-ratio [{low}, {high}]" + (f" step {step}" if step > 1 else "")
    return label, {"width_policy": "keep-ratio", "min_width": low, "max_width": high,
                   "width_step": step}


def _fixed(width: int) -> tuple[str, dict]:
    return f"fixed {width}", {"width_policy": "fixed", "width": width}


#: (label, description overrides) of the policies measured, by input height.
POLICIES: dict[int, list[tuple[str, dict]]] = {
    32: [_fixed(128), _fixed(100), _keep(32, 320), _keep(64, 192), _keep(80, 160),
         _keep(96, 160), _keep(96, 192), _keep(96, 192, 8), _keep(96, 192, 16)],
    48: [_fixed(320), _keep(48, 320), _keep(48, 480), _keep(96, 480), _keep(144, 480),
         _keep(192, 480), _keep(96, 480, 16), _keep(96, 640)],
}


def measure(model: Path, data: Path, overrides: dict, workdir: Path) -> dict[str, float]:
    """Accuracy, mean width, batch count and engine seconds of one policy."""
    spec = describe(model).replace(**overrides)
    folder = workdir / "inputs"
    write_inputs(data, folder, spec, workers=os.cpu_count() or 1, overwrite=True)
    inputs = load_input_set(folder)
    runner, _ = open_model(model)
    with Recognizer(runner, spec) as recognizer:
        run = run_evaluation(recognizer, inputs)
    metrics = recognition_metrics([p.prediction for p in run.predictions],
                                  [p.label for p in run.predictions])
    return {
        "accuracy": metrics["accuracy"],
        "correct": metrics["correct"],
        "scored": metrics["samples"],
        "mean_width": sum(s.width for s in inputs.samples) / max(len(inputs.samples), 1),
        "batches": len(inputs.files()),
        "engine_seconds": run.engine_seconds_sum,
    }


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True,
                        help="model file carrying its description (.onnx)")
    parser.add_argument("--data", type=Path, default=default_test_set(),
                        help="lmdb test set ($IIIT5K_LMDB)")
    return parser


def _run(args) -> int:
    spec = describe(args.model)
    policies = POLICIES.get(spec.height, [_fixed(spec.width)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in policies:
            result = measure(args.model, args.data, overrides, Path(tmp))
            rows.append((label, result))
            print(f"{label}: {result['accuracy']:.4f} ({result['correct']}/{result['scored']}), "
                  f"mean width {result['mean_width']:.1f}, {result['engine_seconds']:.2f} s engine",
                  flush=True)
    base_label, base = rows[0][0], rows[0][1]["engine_seconds"]
    print(f"\n{args.data.name}, {spec.arch}, ONNX Runtime CPU, {available_cores()} cores, "
          "bucketed batches of 16 (equal widths)\n")
    print(f"| policy | word accuracy | correct | mean width (px) | batches | engine s | "
          f"engine vs {base_label} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(f"| {label} | {r['accuracy']:.4f} | {r['correct']}/{r['scored']} | "
              f"{r['mean_width']:.1f} | {r['batches']} | {r['engine_seconds']:.2f} | "
              f"{r['engine_seconds'] / base:.2f}x |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
