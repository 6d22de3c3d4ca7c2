"""Ray scale-out against the one-process path, in one run: what Ray costs and what it gives.

Each row is one ``python -m eval.postprocess --test-dir DATA --onnx-path int8.onnx ...``
command in a child process, on the same int8 model (built as ``bench.e2e`` builds it, not
timed): the one-process path, then ``--executor ray --workers N`` for each N of ``--workers``
(a local Ray with N CPUs, started and stopped by the command; ``--address`` joins a running
cluster instead). Columns:

* ``command s``: the whole command, wall clock (imports, Ray start-up and shutdown included);
* ``Ray start s``: ``ray.init`` alone (the report's ``executor.start_seconds``);
* ``recognition s``: the report's ``e2e_seconds``: for Ray, from handing out the first block
  to the last result, so actor start-up and model loading are in it; for one process, from
  the first input read (the model already loaded);
* ratios against the one-process row of the same run, and whether every prediction equals
  the one-process run's (``eval.compare``).

Example (docs/results/README.md's table):
    python -m bench.scale_out --workers 1,2
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.e2e import build_models
from common.cli import counts, make_parser, run_main
from common.errors import ToolchainError
from eval.compare import compare, read_predictions
from infer.onnxruntime_runner import available_cores
from preprocess.lmdb_reader import default_calibration_set, default_test_set

ROOT = Path(__file__).resolve().parents[1]


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--data", type=Path, default=default_test_set(),
                        help="lmdb test set ($IIIT5K_LMDB)")
    parser.add_argument("--calibration", type=Path, default=default_calibration_set(),
                        help="lmdb for int8 calibration ($IIIT5K_CALIB_LMDB)")
    parser.add_argument("--workers", type=counts, default="1,2",
                        help="Ray worker counts, comma-separated")
    parser.add_argument("--address", help="Ray cluster to join instead of a local Ray")
    return parser


def run_command(label: str, args: Sequence[str], out: Path) -> dict:
    """Run one eval.postprocess command in a child process; its report and wall time."""
    report, predictions = out / "report.json", out / "predictions.csv"
    out.mkdir()
    command = [sys.executable, "-m", "eval.postprocess", *args, "--report", str(report),
               "--predictions", str(predictions)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise ToolchainError(f"{label} failed (exit {done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1:]}")
    return {"label": label, "command_seconds": seconds,
            "report": json.loads(report.read_text()), "predictions": predictions}


def _run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        _, _, int8, build_seconds = build_models(workdir, args.calibration)
        base = ["--test-dir", str(args.data), "--onnx-path", str(int8)]
        rows = [run_command("one process (decoding workers, default)", base, workdir / "one")]
        address = ["--address", args.address] if args.address else []
        rows += [run_command(f"Ray, {n} worker{'s' if n > 1 else ''}",
                             [*base, "--executor", "ray", "--workers", str(n), *address],
                             workdir / f"ray{n}") for n in args.workers]
        first = read_predictions(rows[0]["predictions"])
        for row in rows:
            result = compare(first, read_predictions(row["predictions"]))
            row["same"] = not (result["differ"] or result["only_first"] or result["only_second"])
    print(f"\n{args.data.name}, nano-ocr int8, {available_cores()} cores, one run of "
          f"`python -m bench.scale_out --workers {','.join(map(str, args.workers))}`"
          f"{' --address ' + args.address if args.address else ''}; model build "
          f"{build_seconds:.1f} s, not in the table\n")
    print("| path | command s | Ray start s | recognition s | images/s (recognition) "
          "| command time vs one process | word accuracy | predictions = one process |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    one = rows[0]["command_seconds"]
    for row in rows:
        report = row["report"]
        start = report["executor"].get("start_seconds")
        print(f"| {row['label']} | {row['command_seconds']:.2f} "
              f"| {f'{start:.2f}' if start is not None else '-'} "
              f"| {report['e2e_seconds']:.2f} | {report['images_per_second']:.0f} "
              f"| {row['command_seconds'] / one:.2f}x | {report['accuracy']:.4f} "
              f"| {'yes' if row['same'] else 'NO'} ({report['scored']} scored) |")
    return 0 if all(row["same"] for row in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
