"""Tall crops read three ways (``ModelSpec.tall_crops="turn"``), on real ICDAR 2015 training
crops and the real nano-ocr export: the one-process path, the two-step path in both layouts,
a block worker (what Ray actors and NPU processes run), the in-memory recogniser and the
HTTP service keep the same readings, and turning reads more words than reading upright."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from common.errors import ToolchainError
from eval import postprocess
from eval.blocks import BlockJob, BlockWorker, merge_rows
from infer import open_model
from models.backends import describe
from models.ctc import Decoded, most_confident
from models.registry import spec_for_arch
from models.spec import ModelSpec
from models.weights import save_described
from pipeline import Recognizer
from preprocess import parse_testdata
from preprocess.image import prepare, prepare_readings
from preprocess.lmdb_reader import open_lmdb, read_sample
from serve.process import ServerProcess
from tests.conftest import IIIT5K, encode, write_lmdb

IC15_TRAIN = IIIT5K.parent / "IC15_train_words"
NANO = spec_for_arch("nano-ocr")

needs_ic15 = pytest.mark.skipif(not IC15_TRAIN.is_dir(),
                                reason=f"ICDAR 2015 training crops not found at {IC15_TRAIN}")


def test_a_tall_crop_is_read_upright_then_turned_both_ways():
    pixels = np.arange(60 * 20, dtype=np.uint8).reshape(60, 20)  # 3x as high as wide
    turn = NANO.replace(tall_crops="turn")
    readings, size = prepare_readings(pixels, turn)
    assert size == (20, 60) and [t for t, _ in readings] == [0, 1, -1]
    for k, (_, resized) in zip((0, 1, -1), readings):
        expected, _ = prepare(np.ascontiguousarray(np.rot90(pixels, k)), NANO)
        np.testing.assert_array_equal(resized, expected)
    assert [t for t, _ in prepare_readings(pixels, NANO)[0]] == [0]  # "keep": upright only
    wide = np.zeros((20, 60), np.uint8)
    assert [t for t, _ in prepare_readings(wide, turn)[0]] == [0]
    just = np.zeros((30, 20), np.uint8)  # exactly tall_ratio 1.5
    assert [t for t, _ in prepare_readings(just, turn)[0]] == [0, 1, -1]
    assert [t for t, _ in prepare_readings(just, turn.replace(tall_ratio=1.6))[0]] == [0]


def test_the_description_carries_the_policy_and_refuses_bad_values():
    spec = NANO.replace(tall_crops="turn", tall_ratio=2.0)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    older = {k: v for k, v in NANO.to_dict().items() if k not in ("tall_crops", "tall_ratio")}
    assert ModelSpec.from_dict(older).tall_crops == "keep"  # written before the field existed
    with pytest.raises(ToolchainError, match="tall_crops 'sideways' is unknown"):
        NANO.replace(tall_crops="sideways")
    with pytest.raises(ToolchainError, match="tall ratio 0.5 must be a number >= 1"):
        NANO.replace(tall_ratio=0.5)


def test_the_most_confident_reading_is_kept_and_ties_go_upright():
    def readings(confidences, turns):
        return [(t, Decoded(str(t), c)) for c, t in zip(confidences, turns)]

    assert most_confident(readings([0.2, 0.9, 0.5], [0, 1, -1])).text == "1"
    assert most_confident(readings([0.7, 0.7, 0.7], [-1, 1, 0])).text == "0"  # whatever order
    assert most_confident(readings([0.7, 0.7], [-1, 1])).text == "1"
    with pytest.raises(ValueError):
        most_confident([])


@pytest.fixture(scope="module")
def tall_lmdb(tmp_path_factory) -> Path:
    """See :func:`write_tall_lmdb`."""
    return write_tall_lmdb(tmp_path_factory.mktemp("tall") / "tall_lmdb")


def write_tall_lmdb(path: Path) -> Path:
    """The first 40 crops of IC15_train_words at least 1.5 times as high as wide, 10 wide
    ones, and one undecodable image: 51 indices (skips the test without the data)."""
    if not IC15_TRAIN.is_dir():
        pytest.skip(f"ICDAR 2015 training crops not found at {IC15_TRAIN}")
    tall, wide = [], []
    env = open_lmdb(IC15_TRAIN)
    with env.begin() as txn:
        index = 1
        while len(tall) < 40 or len(wide) < 10:
            raw = read_sample(txn, index)
            width, height = Image.open(io.BytesIO(raw.image)).size
            (tall if height >= 1.5 * width else wide).append((raw.image, raw.label))
            index += 1
    env.close()
    samples = tall[:40] + wide[:10] + [(b"not an image", b"broken")]
    entries = {i + 1: sample for i, sample in enumerate(samples)}
    return write_lmdb(path, entries, len(entries))


@pytest.fixture(scope="module")
def turn_model(tmp_path_factory, exported) -> Path:
    """The nano-ocr export with ``tall_crops="turn"`` in its description."""
    path = tmp_path_factory.mktemp("turn") / "nano_turn.onnx"
    save_described(onnx.load(str(exported["nano-ocr"])),
                   describe(exported["nano-ocr"]).replace(tall_crops="turn"), path)
    return path


def _predictions(path: Path) -> dict[int, tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return {int(r["index"]): (r["prediction"], r["confidence"]) for r in csv.DictReader(handle)}


@needs_ic15
def test_turning_reads_more_tall_words_and_every_path_agrees(tmp_path, tall_lmdb, turn_model,
                                                             exported):
    runs = {}

    def evaluate(name: str, *source: str, model: Path = turn_model) -> dict:
        report, predictions = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        assert postprocess.main([*source, "--onnx-path", str(model), "--report", str(report),
                                 "--predictions", str(predictions)]) == 0
        runs[name] = _predictions(predictions)
        return json.loads(report.read_text())

    upright = evaluate("upright", "--test-dir", str(tall_lmdb), model=exported["nano-ocr"])
    turned = evaluate("one-process", "--test-dir", str(tall_lmdb), "--batch-size", "4")
    assert upright["tall_crops"] == {"mode": "keep", "ratio": 1.5, "kept_turned": 0}
    assert turned["tall_crops"]["mode"] == "turn"
    # nano-ocr reads 8 of these 50 words upright and 20 when it may turn the 40 tall ones.
    assert turned["correct"] >= upright["correct"] + 8
    assert turned["tall_crops"]["kept_turned"] >= 10
    assert turned["scored"] == upright["scored"] == 50 and turned["failed"] == 1
    wide = range(41, 51)
    assert [runs["one-process"][i] for i in wide] == [runs["upright"][i] for i in wide]
    # The flag overrides the description: the plain export with --tall-crops turn.
    evaluate("flag", "--test-dir", str(tall_lmdb), "--tall-crops", "turn",
             model=exported["nano-ocr"])
    assert runs["flag"] == runs["one-process"]

    for layout in ("bucketed", "per-image"):
        inputs = tmp_path / layout
        assert parse_testdata.main(["--test-dir", str(tall_lmdb), "--output-npy", str(inputs),
                                    "--model", str(turn_model), "--layout", layout]) == 0
        manifest = json.loads((inputs / "manifest.json").read_text())
        assert sum(1 for s in manifest["samples"] if s.get("turn")) == 80  # 40 crops x 2 turns
        report = evaluate(layout, "--input-npy", str(inputs))
        assert runs[layout] == runs["one-process"], layout
        assert report["tall_crops"] == turned["tall_crops"]
    # Inputs made with turned readings are read so whatever the model's own description says.
    report = evaluate("plain-model", "--input-npy", str(tmp_path / "bucketed"),
                      model=exported["nano-ocr"])
    assert runs["plain-model"] == runs["one-process"]
    assert report["tall_crops"] == turned["tall_crops"]
    labels = (tmp_path / "per-image" / "label.txt").read_text().splitlines()
    assert len(labels) == 50 and all(line.startswith("test_") for line in labels)
    assert (tmp_path / "per-image" / "turned_1_ccw.npy").is_file()

    worker = BlockWorker(BlockJob(str(tall_lmdb), str(turn_model), batch_size=4))
    try:
        rows = worker.recognise(1, 52)
    finally:
        worker.close()
    scored = {i: p for i, p, s in zip(rows["index"], rows["prediction"], rows["stage"]) if not s}
    assert scored == {i: text for i, (text, _) in runs["one-process"].items()}
    # Scale-out (Ray actors, one process per NPU) merges such rows: the turns survive.
    merged = merge_rows(rows, [(1, 52)], {}, 0.0)
    assert sum(1 for p in merged.run.predictions if p.turn) == turned["tall_crops"]["kept_turned"]

    images = _images(tall_lmdb, 50)
    runner, spec = open_model(turn_model)
    with Recognizer(runner, spec, batch_size=5) as recognizer:
        results = recognizer(images)
    assert [r.text for r in results] == [runs["one-process"][i][0] for i in range(1, 51)]
    assert sum(1 for r in results if r.turn) == turned["tall_crops"]["kept_turned"]


def _images(lmdb_path: Path, count: int) -> list[bytes]:
    env = open_lmdb(lmdb_path)
    with env.begin() as txn:
        images = [read_sample(txn, i).image for i in range(1, count + 1)]
    env.close()
    return images


@needs_ic15
def test_the_service_reads_tall_crops_as_the_recogniser_does(tall_lmdb, turn_model):
    images = _images(tall_lmdb, 12)
    runner, spec = open_model(turn_model)
    with Recognizer(runner, spec, batch_size=1) as recognizer:
        expected = [recognizer([image])[0] for image in images]
    assert any(r.turn for r in expected)
    with ServerProcess(["--model", str(turn_model), "--name", "crnn", "--max-queue", "8"]
                       ) as running, \
            httpx.Client(base_url=running.url, timeout=30) as client:
        served = [client.post("/service", content=image).json() for image in images]
        # A request of 3 tall crops takes 9 queue slots: more than --max-queue 8.
        full = client.post("/v2/models/crnn/infer", json=_v2_body(images[:3]))
    assert [s["text"] for s in served] == [e.text for e in expected]
    np.testing.assert_allclose([s["confidence"] for s in served],
                               [e.confidence for e in expected], rtol=1e-4)
    assert full.status_code == 413, full.text
    assert "3 images make 9 readings" in full.json()["error"]


def _v2_body(images: list[bytes]) -> dict:
    import base64

    return {"inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images]}]}


def test_encoded_and_decoded_tall_crops_give_the_same_readings():
    pixels = np.random.default_rng(0).integers(0, 256, (80, 16), dtype=np.uint8)
    spec = NANO.replace(tall_crops="turn", width_policy="keep-ratio")
    from_bytes, size = prepare_readings(encode(Image.fromarray(pixels)), spec)
    from_pixels, _ = prepare_readings(pixels, spec)
    assert size == (16, 80)
    upright, turned = spec.resized_width(16, 80), spec.resized_width(80, 16)
    assert turned > upright
    assert [(t, r.shape) for t, r in from_bytes] == [(0, (32, upright)), (1, (32, turned)),
                                                     (-1, (32, turned))]
    for (_, a), (_, b) in zip(from_bytes, from_pixels):
        np.testing.assert_array_equal(a, b)


def test_a_crop_whose_turned_reading_fails_is_failed_once_not_scored_upright(tmp_path, exported):
    """The engine rejects inputs wider than 120 px: a 20x90 crop reads upright at the minimum
    width but turned at 32 x 90 / 20 = 144 px, so its turned readings fail. The sample is one
    failure with the engine's reason; a 100 px wide word beside it is scored."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from eval.evaluate import run_batches
    from infer.onnxruntime_runner import OnnxRuntimeRunner
    from preprocess.stream import stream_batches

    class RejectsWide(OnnxRuntimeRunner):
        def _infer(self, feed):
            if feed["imgs"].shape[3] > 120:
                raise Fail("width above the compiled range")
            return super()._infer(feed)

    tall = Image.new("L", (20, 90), 230)
    wide = Image.new("L", (100, 32), 230)
    lmdb_path = write_lmdb(tmp_path / "lmdb", {1: (encode(tall), b"tall"),
                                               2: (encode(wide), b"wide")}, 2)
    spec = describe(exported["nano-ocr"]).replace(tall_crops="turn", width_policy="keep-ratio")
    assert spec.resized_width(20, 90) <= spec.resized_width(100, 32) <= 120 < spec.resized_width(
        90, 20)
    stream = stream_batches(lmdb_path, spec, batch_size=4)
    with Recognizer(RejectsWide(exported["nano-ocr"]), spec) as recognizer:
        run = run_batches(recognizer, stream.batches, stream.count, warmup=0)
    assert [(f["index"], f["stage"]) for f in run.failed] == [(1, "infer")]
    assert "width above the compiled range" in run.failed[0]["reason"]
    assert [p.index for p in run.predictions] == [2]


def test_a_manifest_reading_with_an_unknown_turn_is_one_line(tmp_path, tiny_lmdb, exported,
                                                             capsys):
    inputs = tmp_path / "inputs"
    assert parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(inputs),
                                "--model", str(exported["nano-ocr"])]) == 0
    manifest = json.loads((inputs / "manifest.json").read_text())
    manifest["samples"][2]["turn"] = 2
    (inputs / "manifest.json").write_text(json.dumps(manifest))
    assert postprocess.main(["--input-npy", str(inputs), "--onnx-path",
                             str(exported["nano-ocr"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("manifest.json: sample 3 has turn 2; a reading's turn is one of "
                            "[0, 1, -1]")
