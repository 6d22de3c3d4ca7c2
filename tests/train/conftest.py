"""Fixtures of the training tests: rendered words."""

from __future__ import annotations

import os
import subprocess
import sys
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


def train_one_and_two_processes(arguments: list[str], folder: Path) -> tuple:
    """``python -m train ARGUMENTS`` as one process with one thread (``--out FOLDER/one``) and
    as two gloo processes under torchrun (``--out FOLDER/two``), one thread each; both must
    succeed. Returns the two finished ``subprocess.CompletedProcess``."""
    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "train", *arguments, "--out",
                          str(folder / "one"), "--threads", "1"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "train", *arguments, "--out",
                          str(folder / "two")], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, [line for line in two.stderr.splitlines()
                                 if "error" in line.lower()][:20]
    assert "on 2 process(es)" in two.stdout
    return one, two
