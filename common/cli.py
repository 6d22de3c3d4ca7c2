"""Shared plumbing for the ``python -m <folder>.<tool>`` command-line tools."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import ToolchainError

REPO_ROOT = Path(__file__).resolve().parents[1]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's line breaks and shows each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _prog() -> str | None:
    """``python -m folder.tool`` when this process runs one of the project's modules."""
    path = Path(sys.argv[0]).resolve()
    try:
        relative = path.relative_to(REPO_ROOT)
    except ValueError:
        return None
    if relative.suffix != ".py":
        return None
    parts = relative.with_suffix("").parts
    if parts[-1] == "__main__":  # python -m serve runs serve/__main__.py
        parts = parts[:-1]
    return "python -m " + ".".join(parts)


def positive(kind: type) -> Callable[[str], float]:
    """An argparse ``type`` parsing ``kind`` (int or float) and refusing values <= 0, and NaN
    and infinity."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    return parse


def counts(text: str) -> list[int]:
    """An argparse ``type`` parsing comma-separated whole numbers, each >= 1 (``1,2,8``)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated counts like 1,2, got {text!r}") \
            from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return values


def probability(text: str) -> float:
    """An argparse ``type`` parsing a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative(text: str) -> float:
    """An argparse ``type`` parsing a finite float >= 0 (NaN and infinity refused, as
    :func:`positive` refuses them)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose help is the module docstring, with defaults shown."""
    return argparse.ArgumentParser(prog=_prog(), description=doc, formatter_class=_HelpFormatter)


def run_main(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, configure logging, run ``body`` and map errors to exit codes.

    Returns:
        ``body``'s exit code, or 1 after printing ``error: <message>`` on stderr when it
        raises :class:`ToolchainError` (no traceback), or 130 on Ctrl-C (every output is
        written aside and renamed whole, so none is left half-written).
    """
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return body(args)
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; outputs not yet complete were not written", file=sys.stderr)
        return 130
