"""Training speed of the recognisers: images/s of ``python -m train``, one process and two.

Each model (``--models``, registry names or files ``train --init`` takes) fine-tunes on the
same lmdb for the same number of steps and global batch, with its default recipe (frozen first
convolutions and BatchNorm statistics, photometric augmentation) and no validation, first as
one process on every core, then as two processes under ``torchrun`` (gloo, each with half the
cores). The rate is the trainer's own (``log.csv``'s ``images_per_second``: images trained
over the epoch's seconds, data loading and checkpoints excluded). The table gives each rate
as a ratio to the first model's one-process rate, measured in the same command, and is
printed as Markdown for docs/results/training.md.

Example (docs/results/training.md, training speed of converted models):
    python -m bench.train_speed --models nano-ocr,ppocr-v6-rec --steps 40
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common.cli import counts, make_parser, positive, run_main
from common.errors import ToolchainError
from infer.onnxruntime_runner import available_cores

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "IC15_train_words"


def train_rate(init: str, data: Path, steps: int, batch: int, processes: int,
               out: Path) -> float:
    """Images/s of one ``python -m train`` run of ``steps`` updates (``processes`` > 1:
    under torchrun). Raises ToolchainError with the run's last lines if it fails."""
    cores = available_cores()
    command = [sys.executable, "-m", "train", "--init", init, "--train", str(data),
               "--out", str(out), "--batch-size", str(batch), "--max-steps", str(steps),
               "--epoch-samples", str(steps * batch), "--epochs", "1", "--val-split", "0",
               "--threads", str(max(1, cores // processes)), "--workers", str(cores)]
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(processes), "-m", "train"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))})
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ToolchainError(f"train --init {init} on {processes} process(es) failed: {tail}")
    rows = list(csv.DictReader((out / "log.csv").open(encoding="utf-8")))
    return float(rows[-1]["images_per_second"])


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--models", default="nano-ocr,ppocr-v6-rec",
                        help="comma-separated --init values; the first is the baseline")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training lmdb")
    parser.add_argument("--steps", type=positive(int), default=40)
    parser.add_argument("--batch-size", type=positive(int), default=32, help="global batch")
    parser.add_argument("--processes", type=counts, default="1,2",
                        help="comma-separated process counts (1: plain; more: torchrun)")
    return parser


def _run(args) -> int:
    if not args.data.is_dir():
        raise ToolchainError(f"--data {args.data}: no such lmdb folder")
    models = [m for m in args.models.split(",") if m]
    if not models:
        raise ToolchainError(f"--models {args.models!r}: give at least one --init value")
    processes = args.processes
    rates: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
        for model in models:
            for count in processes:
                out = Path(scratch) / f"{len(rates)}"
                rates[model, count] = train_rate(model, args.data, args.steps, args.batch_size,
                                                 count, out)
                print(f"{model}, {count} process(es): {rates[model, count]:.1f} images/s",
                      flush=True)
    base = rates[models[0], processes[0]]
    print(f"\n{args.steps} steps of batch {args.batch_size} on {args.data.name}, "
          f"{available_cores()} cores; ratio to {models[0]} on {processes[0]} process(es)\n")
    print("| model | processes | images/s | ratio |\n| --- | --- | --- | --- |")
    for (model, count), rate in rates.items():
        print(f"| {model} | {count} | {rate:.1f} | {rate / base:.2f} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
