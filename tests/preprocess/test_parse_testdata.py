"""parse_testdata on tiny lmdbs with every kind of image and failure, and on IIIT5K."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import ToolchainError
from preprocess import parse_testdata
from tests.conftest import IIIT5K, write_lmdb

EXPECTED_FAILED = [
    {"index": 7, "reason": "not a decodable image"},
    {"index": 8, "reason": "missing label key"},
    {"index": 10, "reason": "no image or label key (num-samples is 10, the largest index present"},
]


def _check_failed(manifest):
    assert [f["index"] for f in manifest["failed"]] == [f["index"] for f in EXPECTED_FAILED]
    for got, want in zip(manifest["failed"], EXPECTED_FAILED):
        assert got["reason"].startswith(want["reason"])


@pytest.mark.parametrize("workers", [1, 2])
def test_bucketed_keep_ratio(tmp_path, tiny_lmdb, workers, capsys):
    out = tmp_path / "inputs"
    rc = parse_testdata.main(["--test_dir", str(tiny_lmdb), "--output_npy", str(out),
                              "--arch", "nano-ocr", "--width-policy", "keep-ratio",
                              "--batch-size", "2", "--workers", str(workers)])
    assert rc == 0
    assert "read 10, written 7, failed 3" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    _check_failed(manifest)
    samples = {s["index"]: s for s in manifest["samples"]}
    assert sorted(samples) == [1, 2, 3, 4, 5, 6, 9]
    assert samples[2]["label"] == "Jpeg" and samples[2]["size"] == [120, 40]
    expected_widths = {1: 100, 2: 96, 3: 128, 4: 96, 5: 96, 6: 128, 9: 192}
    assert {i: s["width"] for i, s in samples.items()} == expected_widths
    for sample in samples.values():  # each row holds exactly its own width: no padding
        batch = np.load(out / sample["file"])
        assert batch.dtype == np.float32 and batch.shape[1:3] == (1, 32)
        assert batch.shape[3] == sample["width"]
    grey = np.load(out / samples[3]["file"])[samples[3]["row"], 0]
    assert grey.min() >= -1.0 and grey.max() <= 1.0
    assert not (out / "label.txt").exists()  # it would name test_<i>.npy files never written
    assert manifest["policy"]["width_policy"] == "keep-ratio"


def test_per_image_layout_and_fixed_width(tmp_path, tiny_lmdb):
    out = tmp_path / "inputs"
    spec = parse_testdata.resolve_spec(None, "nano-ocr", width_policy="fixed")
    manifest = parse_testdata.write_inputs(tiny_lmdb, out, spec, layout="per-image")
    _check_failed(manifest)
    for sample in manifest["samples"]:
        assert sample["file"] == f"test_{sample['index']}.npy" and sample["row"] == 0
        assert np.load(out / sample["file"]).shape == (1, 1, 32, 128)


def test_padding_when_allowed(tmp_path, tiny_lmdb):
    spec = parse_testdata.resolve_spec(None, "nano-ocr", width_policy="keep-ratio")
    manifest = parse_testdata.write_inputs(tiny_lmdb, tmp_path / "o", spec, batch_size=16,
                                           max_pad=1000)
    assert len({s["file"] for s in manifest["samples"]}) == 1
    batch = np.load(tmp_path / "o" / "batch_00000.npy")
    narrow = next(s for s in manifest["samples"] if s["width"] == 96)
    assert batch.shape == (7, 1, 32, 192)
    assert np.all(batch[narrow["row"], 0, :, 96:] == 0.0)


def test_model_metadata_is_used(tmp_path, tiny_lmdb, exported):
    manifest = parse_testdata.write_inputs(
        tiny_lmdb, tmp_path / "o", parse_testdata.resolve_spec(exported["crnn-meijieru"], None))
    assert manifest["model"]["arch"] == "crnn"
    assert {s["width"] for s in manifest["samples"]} == {100}


def test_more_failures_non_utf8_empty_label_missing_count(tmp_path, capsys):
    from tests.conftest import encode, word_image

    image = encode(word_image("ok"))
    path = write_lmdb(tmp_path / "db", {1: (image, b"ok"), 2: (image, b"\xff"), 3: (image, b"")},
                      num_samples=None)
    out = tmp_path / "o"
    assert parse_testdata.main(["--test_dir", str(path), "--output_npy", str(out),
                                "--arch", "crnn", "--workers", "1"]) == 0
    reasons = [f["reason"] for f in json.loads((out / "manifest.json").read_text())["failed"]]
    assert reasons[0].startswith("label is not UTF-8") and reasons[1] == "empty label"
    assert parse_testdata.main(["--test_dir", str(path), "--output_npy", str(out),
                                "--arch", "crnn", "--workers", "1", "--strict"]) == 1


def test_all_failed_exits_non_zero(tmp_path):
    path = write_lmdb(tmp_path / "db", {1: (b"junk", b"a")}, num_samples=1)
    assert parse_testdata.main(["--test_dir", str(path), "--output_npy", str(tmp_path / "o"),
                                "--arch", "crnn", "--workers", "1"]) == 1


def test_not_an_lmdb_is_one_line(tmp_path, capsys):
    assert parse_testdata.main(["--test_dir", str(tmp_path), "--output_npy",
                                str(tmp_path / "o"), "--arch", "crnn"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: not an lmdb folder") and err.count("\n") == 1


def test_rerun_replaces_output_and_refuses_foreign_folder(tmp_path, tiny_lmdb):
    spec = parse_testdata.resolve_spec(None, "crnn")
    out = tmp_path / "o"
    parse_testdata.write_inputs(tiny_lmdb, out, spec, layout="per-image")
    with pytest.raises(ToolchainError, match="pass --overwrite"):
        parse_testdata.write_inputs(tiny_lmdb, out, spec)
    parse_testdata.write_inputs(tiny_lmdb, out, spec, overwrite=True)
    assert not list(out.glob("test_*.npy")) and list(out.glob("batch_*.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "tiny_lmdb"]  # no staging left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ToolchainError, match="not written by parse_testdata"):
        parse_testdata.write_inputs(tiny_lmdb, foreign, spec, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(not IIIT5K.is_dir(), reason=f"IIIT5K lmdb not found at {IIIT5K}")
@pytest.mark.parametrize("layout", ["bucketed", "per-image"])
def test_iiit5k_all_samples(tmp_path, layout, capsys):
    out = tmp_path / layout
    assert parse_testdata.main(["--test_dir", str(IIIT5K), "--output_npy", str(out),
                                "--arch", "nano-ocr", "--layout", layout]) == 0
    assert "read 3000, written 3000, failed 0" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["samples"]) == 3000 and manifest["failed"] == []
