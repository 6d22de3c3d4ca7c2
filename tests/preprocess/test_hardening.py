"""Bad arguments and damaged files: nothing deleted that the tool did not write, clear errors.

Each test reproduces a row of the hardening issue on real lmdbs and folders made here.
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from common.errors import ToolchainError
from convert import quantize
from models.registry import spec_for_arch
from preprocess import parse_testdata
from tests.conftest import IIIT5K, encode, word_image, write_lmdb

NANO = spec_for_arch("nano-ocr")


def _five(tmp_path, num_samples, name="five"):
    entries = {i: (encode(word_image(f"w{i}", 80 + 10 * i)), f"w{i}".encode()) for i in range(1, 6)}
    return write_lmdb(tmp_path / name, entries, num_samples)


def _parse(lmdb, out, *extra):
    return parse_testdata.main(["--test-dir", str(lmdb), "--output-npy", str(out), "--arch",
                                "nano-ocr", "--workers", "1", *extra])


def test_a_folder_the_tool_did_not_write_is_never_touched(tmp_path, capsys):
    lmdb = _five(tmp_path, 5)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "manifest.json").write_text("{}")  # a file name anyone can have
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"keep me too")
    for extra in ((), ("--overwrite",)):
        assert _parse(lmdb, mine, *extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "not written by parse_testdata" in err
        assert "\n" not in err
    assert sorted(p.name for p in mine.rglob("*")) == ["data.bin", "manifest.json", "notes.txt",
                                                       "sub"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_its_own_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    lmdb = _five(tmp_path, 5)
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert _parse(lmdb, out) == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755  # the umask, not mkdtemp's 0700
    first = json.loads((out / "manifest.json").read_text())["output_id"]
    assert _parse(lmdb, out) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert _parse(lmdb, out, "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["output_id"] != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no leftovers
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _parse(lmdb, a_file) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_truncated_data_mdb_is_an_error_naming_it(tmp_path, capsys):
    big = {i: (encode(Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 400),
                                                                        dtype=np.uint8))),
               b"noise") for i in range(1, 41)}
    lmdb = write_lmdb(tmp_path / "big", big, 40)
    data = (lmdb / "data.mdb").read_bytes()
    (lmdb / "data.mdb").write_bytes(data[: len(data) // 2])
    assert _parse(lmdb, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{lmdb / 'data.mdb'}: truncated" in err and "\n" not in err.strip()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ToolchainError, match="truncated"):
        quantize.load_calibration_set(lmdb, NANO)


def test_a_huge_num_samples_is_one_failure_range(tmp_path, caplog):
    lmdb = _five(tmp_path, 50_000_000)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert _parse(lmdb, out) == 0
    assert "num-samples is 50000000 but the largest index present is 5" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 50_000_000 and len(manifest["samples"]) == 5
    (missing,) = manifest["failed"]
    assert (missing["index"], missing["last"], missing["count"]) == (6, 50_000_000, 49_999_995)
    assert parse_testdata.failed_count(manifest["failed"]) == 49_999_995
    assert len((out / "manifest.json").read_bytes()) < 10_000


def test_entries_beyond_num_samples_are_counted_and_bad_counts_refused(tmp_path, caplog, capsys):
    lmdb = _five(tmp_path, 3)
    with caplog.at_level(logging.WARNING):
        assert _parse(lmdb, tmp_path / "out") == 0
    assert "2 indices above num-samples 3 have keys and are NOT read" in caplog.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["entries_beyond_num_samples"] == 2 and len(manifest["samples"]) == 3
    for count in (0, -3):
        bad = _five(tmp_path, count, name=f"n{count}")
        assert _parse(bad, tmp_path / f"o{count}") == 1
        assert f"num-samples is {count}; it must be at least 1" in capsys.readouterr().err
        assert not (tmp_path / f"o{count}").exists()


def _rare_formats() -> dict[str, bytes]:
    dds, spider = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(dds, format="DDS")
    Image.new("F", (16, 16), 0.5).save(spider, format="SPIDER")
    return {"DDS": dds.getvalue(), "SPIDER": spider.getvalue()}


def test_rare_formats_are_sample_failures_and_the_run_goes_on(tmp_path):
    rare = _rare_formats()
    entries = {1: (encode(word_image("good")), b"good"), 2: (rare["DDS"], b"dds"),
               3: (rare["SPIDER"], b"spider"), 4: (encode(word_image("fine")), b"fine")}
    lmdb = write_lmdb(tmp_path / "rare", entries, 4)
    assert _parse(lmdb, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["samples"]] == [1, 4]
    reasons = {f["index"]: f["reason"] for f in manifest["failed"]}
    assert set(reasons) == {2, 3}
    assert all(r.startswith("not a decodable image (UnidentifiedImageError")
               for r in reasons.values())
    assert all("0x" not in r for r in reasons.values())  # no memory addresses
    calibration = quantize.load_calibration_set(lmdb, NANO)
    assert calibration.used == 2 and [f["index"] for f in calibration.failed] == [2, 3]


@pytest.mark.skipif(not IIIT5K.is_dir(), reason=f"IIIT5K lmdb not found at {IIIT5K}")
def test_ctrl_c_to_the_process_group_exits_promptly_and_leaves_nothing(tmp_path):
    """SIGINT to the whole group (what Ctrl-C sends) from start-up to the end, five times: the
    output folder is whole or absent, and no partial folder is left."""
    import signal
    import subprocess
    import sys
    import time

    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "preprocess.parse_testdata", "--test-dir", str(IIIT5K),
             "--output-npy", str(out), "--arch", "nano-ocr", "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(0.3 + 0.3 * attempt)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"attempt {attempt}: still running 30 s after Ctrl-C")
        # 130: interrupted in the tool (one line, no traceback); -SIGINT: interrupted while
        # Python was still starting or importing, before the tool ran; 0: it had finished.
        assert proc.returncode in (0, 130, -signal.SIGINT), proc.returncode
        if out.exists():  # whole or not at all: the signal may come after the rename into place
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            assert len(manifest["samples"]) + len(manifest["failed"]) == manifest["num_samples"]
            assert all((out / s["file"]).is_file() for s in manifest["samples"])
        else:
            assert proc.returncode, "it finished but wrote nothing"
        if proc.returncode == 130:
            assert b"Traceback" not in proc.stderr.read()
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
