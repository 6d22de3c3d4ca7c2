"""Fixtures of the training tests: rendered words."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.synth import find_fonts, read_corpus, synthesise

WORDS = ["street", "Hotel", "EXIT", "coffee", "42", "Bank", "open", "SALE", "taxi", "Park"]


@pytest.fixture(scope="session")
def synth_words(tmp_path_factory) -> Path:
    """80 rendered words (DejaVu fonts, augmented), seed 0."""
    folder = tmp_path_factory.mktemp("synth")
    corpus = folder / "words.txt"
    corpus.write_text("\n".join(f"{w}\t{n}" for n, w in enumerate(WORDS)), encoding="utf-8")
    synthesise(folder / "lmdb", read_corpus(corpus), find_fonts([]), 80, seed=0,
               progress=False)
    return folder / "lmdb"
