"""Seeded fuzzing of damaged lmdb entries: every index is scored or failed with a reason.

About 200 entries: valid PNG and JPEG words, the same bytes mutated (bit flips, cut short,
chunks swapped, headers damaged), images and labels missing, labels that are not UTF-8,
empty, or span two lines. Both the two-step flow and the one-process path must account for
each index exactly once, with no exception escaping. Bounded: one lmdb, two passes.
"""

from __future__ import annotations

import csv
import json
import random

from eval import postprocess
from preprocess import parse_testdata
from tests.conftest import encode, word_image, write_lmdb

SEED = 20261122
ENTRIES = 200


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    buffer = bytearray(data)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 12)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # cut short
        del buffer[rng.randint(1, max(1, len(buffer) - 1)):]
    elif kind == 2:  # swap two chunks
        a, b = sorted(rng.sample(range(len(buffer)), 2))
        buffer[a:b] = buffer[a:b][::-1]
    elif kind == 3:  # damage the header
        for i in range(min(16, len(buffer))):
            buffer[i] = rng.randrange(256)
    else:  # random bytes of a plausible size
        buffer = bytearray(rng.randbytes(rng.randint(0, 200)))
    return bytes(buffer)


def _fuzz_lmdb(path):
    rng = random.Random(SEED)
    entries = {}
    for index in range(1, ENTRIES + 1):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))
        image = encode(word_image(word, rng.randint(40, 160), rng.randint(16, 48), "RGB"),
                       rng.choice(["PNG", "JPEG"]))
        label = word.encode()
        roll = rng.random()
        if roll < 0.45:
            image = _mutate(image, rng)
        elif roll < 0.50:
            image = None
        elif roll < 0.55:
            label = None
        elif roll < 0.60:
            label = rng.choice([b"\xff\xfe", b"", b"two\nlines", b"  "])
        entries[index] = (image, label)
    return write_lmdb(path, entries, ENTRIES)


def test_every_index_is_scored_or_failed_with_a_reason(tmp_path, exported, fixed_models):
    lmdb = _fuzz_lmdb(tmp_path / "fuzz")
    inputs = tmp_path / "inputs"
    assert parse_testdata.main(["--test-dir", str(lmdb), "--output-npy", str(inputs),
                                "--model", str(exported["nano-ocr"]), "--workers", "2"]) == 0
    runs = {}
    for name, source in (("two-step", ["--input-npy", str(inputs)]),
                         ("one-process", ["--test-dir", str(lmdb), "--workers", "2"])):
        report, predictions = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        assert postprocess.main([*source, "--onnx-path", str(fixed_models["nano-ocr"]),
                                 "--report", str(report), "--predictions", str(predictions)]) == 0
        report = json.loads(report.read_text())
        scored = [int(row["index"]) for row in csv.DictReader(predictions.open())]
        failed = [f["index"] for f in report["failures"]]
        assert sorted(scored + failed) == list(range(1, ENTRIES + 1)), name  # once each
        assert report["samples"] == ENTRIES and report["scored"] + report["failed"] == ENTRIES
        assert all(f["reason"] and "0x" not in f["reason"] for f in report["failures"])
        runs[name] = (scored, sorted(failed))
    assert runs["two-step"] == runs["one-process"]
    assert 20 < len(runs["two-step"][1]) < ENTRIES  # the fuzz did damage, not everything
