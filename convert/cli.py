"""Shared plumbing for the ``python -m <folder>.<tool>`` command-line tools."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from convert.errors import ToolchainError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's line breaks and shows each option's default."""


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose help is the module docstring, with defaults shown."""
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def run_main(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, configure logging, run ``body`` and map errors to exit codes.

    Returns:
        ``body``'s exit code, or 1 after printing ``error: <message>`` on stderr when it
        raises :class:`ToolchainError` (no traceback).
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
