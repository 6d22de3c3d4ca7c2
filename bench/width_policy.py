"""Measure width policies on a test set: accuracy, mean input width and engine time.

For each policy (fixed width, and keep-ratio with several clamps and rounding steps) the
set is preprocessed with ``preprocess.parse_testdata`` (bucketed, equal-width batches) and
evaluated with ``eval`` through ONNX Runtime on one model, all in this process, so the
rows are comparable. The table is printed as Markdown (paste it into the README).

Example (the README's table):
    python -m bench.width_policy --model work/nano_fixed.onnx
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from convert.cli import make_parser, run_main
from convert.spec import read_onnx_spec
from eval.evaluate import run_evaluation
from eval.inputs import load_input_set
from eval.metrics import recognition_metrics
from infer import OnnxRuntimeRunner
from infer.onnxruntime_runner import available_cores
from preprocess.lmdb_reader import default_test_set
from preprocess.parse_testdata import write_inputs


#: (label, spec overrides) of the policies measured.
POLICIES: list[tuple[str, dict]] = [
    ("fixed 128", {"width_policy": "fixed", "width": 128}),
    ("fixed 100", {"width_policy": "fixed", "width": 100}),
    ("keep-ratio [32, 320]", {"width_policy": "keep-ratio", "min_width": 32, "max_width": 320}),
    ("keep-ratio [64, 192]", {"width_policy": "keep-ratio", "min_width": 64, "max_width": 192}),
    ("keep-ratio [80, 160]", {"width_policy": "keep-ratio", "min_width": 80, "max_width": 160}),
    ("keep-ratio [96, 160]", {"width_policy": "keep-ratio", "min_width": 96, "max_width": 160}),
    ("keep-ratio [96, 192]", {"width_policy": "keep-ratio", "min_width": 96, "max_width": 192}),
    ("keep-ratio [96, 192] step 8",
     {"width_policy": "keep-ratio", "min_width": 96, "max_width": 192, "width_step": 8}),
    ("keep-ratio [96, 192] step 16",
     {"width_policy": "keep-ratio", "min_width": 96, "max_width": 192, "width_step": 16}),
]


def measure(model: Path, data: Path, overrides: dict, workdir: Path) -> dict[str, float]:
    """Accuracy, mean width, batch count and engine seconds of one policy."""
    spec = read_onnx_spec(model).replace(**overrides)
    folder = workdir / "inputs"
    write_inputs(data, folder, spec, workers=os.cpu_count() or 1)
    inputs = load_input_set(folder)
    with OnnxRuntimeRunner(model) as runner:
        run = run_evaluation(runner, inputs, spec)
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
    parser.add_argument("--model", type=Path, required=True, help="ONNX model with metadata")
    parser.add_argument("--data", type=Path,
                        default=default_test_set(),
                        help="lmdb test set ($IIIT5K_LMDB)")
    return parser


def _run(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in POLICIES:
            result = measure(args.model, args.data, overrides, Path(tmp))
            rows.append((label, result))
            print(f"{label}: {result['accuracy']:.4f} ({result['correct']}/{result['scored']}), "
                  f"mean width {result['mean_width']:.1f}, {result['engine_seconds']:.2f} s engine",
                  flush=True)
    base = rows[0][1]["engine_seconds"]
    print(f"\n{args.data.name}, {read_onnx_spec(args.model).arch}, ONNX Runtime CPU, "
          f"{available_cores()} cores, bucketed batches of 16 (equal widths)\n")
    print("| policy | word accuracy | correct | mean width (px) | batches | engine s | engine vs fixed 128 |")
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
