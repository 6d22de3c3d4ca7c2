"""The synthetic lmdb: readable by parse_testdata with no failures, refuses to overwrite."""

from __future__ import annotations

import pytest

from common.errors import ToolchainError
from preprocess import parse_testdata
from preprocess.make_synthetic_lmdb import WORDS, write_synthetic_lmdb


def test_round_trip(tmp_path):
    path = write_synthetic_lmdb(tmp_path / "synth", samples=12, seed=3)
    manifest = parse_testdata.write_inputs(path, tmp_path / "inputs",
                                           parse_testdata.resolve_spec(None, "nano-ocr"))
    assert len(manifest["samples"]) == 12 and manifest["failed"] == []
    assert all(s["label"] in WORDS for s in manifest["samples"])
    with pytest.raises(ToolchainError, match="already holds an lmdb"):
        write_synthetic_lmdb(path, samples=1)
