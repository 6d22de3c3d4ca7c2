"""Count samples whose decoded strings differ between two predictions.csv files.

Used to check that batched inference equals batch-1 inference: run eval.postprocess on the
bucketed and on the per-image inputs of the same set with the same model, then compare.
Exit status: 0 when every common sample decodes the same and both files hold the same
samples, 1 otherwise (so it can gate CI), 1 with one line on bad input.

Example:
    python -m eval.compare work/bucketed/predictions.csv work/per_image/predictions.csv
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from common.errors import ToolchainError


def read_predictions(path: Path) -> dict[int, str]:
    """``{index: prediction}`` from an eval.postprocess predictions.csv.

    Raises:
        ToolchainError: missing file or missing columns.
    """
    if not path.is_file():
        raise ToolchainError(f"{path}: no such predictions file")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"index", "prediction"} <= set(reader.fieldnames or ()):
            raise ToolchainError(f"{path}: needs 'index' and 'prediction' columns")
        return {int(row["index"]): row["prediction"] for row in reader}


def compare(first: dict[int, str], second: dict[int, str]) -> dict[str, object]:
    """``{"common", "differ", "only_first", "only_second", "examples"}`` for two prediction maps."""
    common = sorted(first.keys() & second.keys())
    differ = [i for i in common if first[i] != second[i]]
    return {
        "common": len(common),
        "differ": len(differ),
        "only_first": len(first.keys() - second.keys()),
        "only_second": len(second.keys() - first.keys()),
        "examples": [(i, first[i], second[i]) for i in differ[:10]],
    }


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    return parser


def _run(args) -> int:
    result = compare(read_predictions(args.first), read_predictions(args.second))
    if result["examples"]:
        print(f"  sample: first ({args.first}) vs second ({args.second})")
    for index, a, b in result["examples"]:
        print(f"  {index}: {a!r} vs {b!r}")
    print(f"{result['differ']} of {result['common']} common samples decode differently "
          f"({result['only_first']} only in the first file, "
          f"{result['only_second']} only in the second)")
    same = not (result["differ"] or result["only_first"] or result["only_second"])
    return 0 if same else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
