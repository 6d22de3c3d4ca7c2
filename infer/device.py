"""Device spellings, one grammar for every tool (inference, evaluation, serving, training).

``cpu``; ``cuda`` or ``cuda:N``; ``npu`` or ``npu:N``; a bare ``N`` means ``npu:N`` (ais_bench's
and the ModelZoo's ``--device`` habit). Without an index a process takes the default device of
its kind: device 0, or under torchrun the device of its ``LOCAL_RANK`` (``train``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import ToolchainError

__all__ = ["DEVICE_SPELLINGS", "Device", "parse_device"]

#: How the spellings are named in messages and ``--help``.
DEVICE_SPELLINGS = "cpu, cuda, cuda:N, npu or npu:N (N alone is npu:N)"
_DEVICE = re.compile(r"^(?:(cpu|cuda|npu)(?::(\d+))?|(\d+))$")


@dataclass(frozen=True)
class Device:
    """Where a model runs.

    Attributes:
        kind: ``"cpu"``, ``"cuda"`` or ``"npu"``.
        index: the device's index, or None for the default one of its kind (always None
            for the CPU).
    """

    kind: str
    index: int | None = None

    @property
    def ordinal(self) -> int:
        """The index this process uses on its own: ``index``, or 0 by default."""
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str) -> Device:
    """A device spelling (module docstring) as a :class:`Device`; white space around is ignored.

    Raises:
        ToolchainError: any other spelling, or an index on the CPU.
    """
    match = _DEVICE.match(text.strip())
    if match is None:
        raise ToolchainError(f"device {text!r} is unknown; use {DEVICE_SPELLINGS}")
    kind, index, bare = match.groups()
    if bare is not None:
        return Device("npu", int(bare))
    if kind == "cpu" and index is not None:
        raise ToolchainError(f"device {text!r}: the CPU takes no index; use cpu")
    return Device(kind, None if index is None else int(index))
