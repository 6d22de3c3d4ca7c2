"""A CTC charset: the characters of a recogniser's classes and its blank, both directions.

Class ``blank`` is the CTC blank; the other classes are the characters in order, so class
``c`` is ``characters[c]`` for ``c < blank`` and ``characters[c - 1]`` above it
(``blank = 0``, the usual case, gives ``characters[c - 1]``). This is the convention of
crnn.pytorch's ``strLabelConverter`` and PaddleOCR's ``CTCLabelDecode`` (blank first).
Decoding (class indices -> text) serves the CTC decoders; encoding (text -> class indices)
serves CTC training targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.errors import ToolchainError


@dataclass(frozen=True)
class Charset:
    """Characters of the non-blank classes and the blank's class index.

    Attributes:
        characters: one character per non-blank class, in class order; no repeats.
        blank: class index of the CTC blank, ``0 <= blank <= len(characters)``.
    """

    characters: str
    blank: int = 0
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.characters)) != len(self.characters):
            seen: set[str] = set()
            repeated = next(c for c in self.characters if c in seen or seen.add(c))
            raise ToolchainError(f"charset repeats the character {repeated!r}")
        if not 0 <= self.blank <= len(self.characters):
            raise ToolchainError(f"blank index {self.blank} is outside 0..{len(self.characters)}")
        index = {c: i + (i >= self.blank) for i, c in enumerate(self.characters)}
        object.__setattr__(self, "_index", index)

    @property
    def num_classes(self) -> int:
        """Size of the class axis: the characters plus the blank."""
        return len(self.characters) + 1

    def class_table(self) -> np.ndarray:
        """``<U1`` array, one entry a class: its character, ``"\\0"`` at the blank."""
        chars = self.characters
        return np.array(list(chars[: self.blank] + "\0" + chars[self.blank :]))

    def decode(self, classes: Iterable[int]) -> str:
        """Text of a sequence of non-blank class indices (already collapsed by CTC decoding).

        Raises:
            ValueError: an index is the blank or outside ``0..num_classes - 1``.
        """
        table = self.characters
        out = []
        for c in classes:
            c = int(c)
            if c == self.blank or not 0 <= c < self.num_classes:
                raise ValueError(f"class {c} is the blank or outside 0..{self.num_classes - 1}")
            out.append(table[c - 1 if c > self.blank else c])
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        """Class indices of ``text``, one per character (a CTC training target).

        Raises:
            ToolchainError: ``text`` holds a character outside the charset (named).
        """
        try:
            return [self._index[c] for c in text]
        except KeyError as exc:
            raise ToolchainError(
                f"{text!r}: character {exc.args[0]!r} is not in the charset "
                f"({len(self.characters)} characters)"
            ) from None

    def unknown(self, text: str) -> list[str]:
        """The characters of ``text`` that are not in the charset, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._index))

    @classmethod
    def from_lines(cls, lines: Sequence[str], blank: int = 0) -> Charset:
        """A charset from one character per entry (a PaddleOCR dictionary file's lines)."""
        bad = [line for line in lines if len(line) != 1]
        if bad:
            raise ToolchainError(f"charset entries must be single characters, got {bad[0]!r}")
        return cls("".join(lines), blank)
