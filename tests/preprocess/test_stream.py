"""Streamed decoding: index order whatever the threads do, and the two-step path's batches."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest

from models.registry import spec_for_arch
from preprocess import parse_testdata
from preprocess.batching import plan_batches
from preprocess.lmdb_reader import open_lmdb
from preprocess.stream import CHUNK, decode_all, decode_indices, stream_batches
from tests.conftest import encode, word_image, write_lmdb


@pytest.fixture
def mixed_widths_lmdb(tmp_path):
    """300 words of 7 widths in a shuffled order, one corrupt image among them."""
    rng = np.random.default_rng(3)
    widths = rng.choice([60, 100, 140, 180, 220, 260, 400], 300)
    entries = {i + 1: (encode(word_image(f"w{i}", int(w), 32)), f"w{i}".encode())
               for i, w in enumerate(widths)}
    entries[150] = (b"not an image", b"bad")
    return write_lmdb(tmp_path / "mixed", entries, num_samples=300)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_index_order(mixed_widths_lmdb, workers):
    spec = spec_for_arch("nano-ocr")
    found, results = decode_all(mixed_widths_lmdb, spec, workers)
    decoded = list(results)
    assert found.readable == 300 > 2 * CHUNK  # several chunks in flight at once
    assert [r[0] for r in decoded] == list(range(1, 301))
    assert decoded[149][4] is not None and decoded[149][2] is None  # the corrupt one, named
    assert all(r[4] is None for i, r in enumerate(decoded) if i != 149)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_streamed_batches_hold_the_two_step_batches(mixed_widths_lmdb, workers):
    """Same members per batch as parse_testdata's plan (preprocess.batching.plan_batches), so
    a model whose results depend on the batch (a dynamically quantised LSTM) agrees too."""
    spec = spec_for_arch("nano-ocr")
    _, results = decode_all(mixed_widths_lmdb, spec, 1)
    good = [r for r in results if r[4] is None]
    planned = {tuple(good[p][0] for p in batch)
               for batch in plan_batches([r[2].shape[1] for r in good], 16)}
    stream = stream_batches(mixed_widths_lmdb, spec, 16, workers)
    streamed = [(batch, tuple(s.index for s in samples)) for batch, samples, _ in stream.batches]
    assert {members for _, members in streamed} == planned
    assert len(streamed) == len(planned)
    assert all(batch.shape[0] == len(members) for batch, members in streamed)
    assert [f["index"] for f in stream.failed] == [150]


def test_a_damaged_key_tree_is_one_line(tmp_path, mixed_widths_lmdb, capsys):
    """Every page after lmdb's two meta pages overwritten: one line naming the folder, and
    parse_testdata writes nothing."""
    data = mixed_widths_lmdb / "data.mdb"
    size = data.stat().st_size
    with data.open("r+b") as handle:
        handle.seek(2 * 4096)
        handle.write(b"\x5a" * (size - 2 * 4096))
    out = tmp_path / "inputs"
    assert parse_testdata.main(["--test-dir", str(mixed_widths_lmdb), "--output-npy", str(out),
                                "--arch", "nano-ocr", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{mixed_widths_lmdb}: damaged lmdb" in err and "Traceback" not in err
    assert not out.exists()


class _DamagedTxn:
    """Test double of an lmdb read transaction whose page under index 2 is damaged: ``get``
    raises ``lmdb.CorruptedError`` there, as py-lmdb does on a bad page."""

    def __init__(self, txn):
        self.txn = txn

    def get(self, key: bytes):
        if key.endswith(b"-000000002"):
            raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type")
        return self.txn.get(key)


def test_an_unreadable_entry_is_a_counted_failure(mixed_widths_lmdb):
    env = open_lmdb(mixed_widths_lmdb)
    with env.begin() as txn:
        decoded = decode_indices(_DamagedTxn(txn), spec_for_arch("nano-ocr"), [1, 2, 3])
    env.close()
    assert [r[0] for r in decoded] == [1, 2, 3]
    assert decoded[1][2] is None and decoded[1][4].startswith("unreadable lmdb entry (")
    assert decoded[0][4] is None and decoded[2][4] is None
