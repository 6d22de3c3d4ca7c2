"""The in-memory recogniser: input order, batched = batch-1, failures, engine batch limits."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import ToolchainError
from convert.atc import plan_shape
from infer import OnnxRuntimeRunner, open_model
from models.sidecar import write_sidecar
from pipeline import Failure, Recognition, Recognizer
from preprocess.lmdb_reader import open_lmdb, read_sample
from tests.conftest import IIIT5K, encode, word_image


def _tiny_images(tiny_lmdb) -> list:
    env = open_lmdb(tiny_lmdb)
    with env.begin() as txn:
        images = [read_sample(txn, i).image for i in range(1, 11)]
    env.close()
    return images


def test_batched_equals_batch_1_in_input_order(tiny_lmdb, fixed_models):
    images = _tiny_images(tiny_lmdb)  # 10 indices: a corrupt image and a missing one among them
    runner, spec = open_model(fixed_models["nano-ocr"])
    with Recognizer(runner, spec, batch_size=16) as recognizer:
        batched = recognizer(images)
        recognizer.batch_size = 1
        single = recognizer(images)
        alone = [recognizer([image])[0] for image in images]
    assert len(batched) == 10
    assert isinstance(batched[6], Failure) and batched[6].stage == "decode"
    assert "not a decodable image" in batched[6].reason
    assert isinstance(batched[9], Failure) and batched[9].reason == "missing image key"
    for first, second, third in zip(batched, single, alone):
        assert type(first) is type(second) is type(third)
        if isinstance(first, Recognition):
            assert first.text == second.text == third.text
            assert first.confidence == pytest.approx(second.confidence, abs=1e-6)
            assert first.char_frames == third.char_frames and first.width == third.width
            assert first.frames == spec.frames(first.width)
    assert batched[0].size == (100, 32) and batched[8].width == spec.max_width


def test_pillow_images_and_arrays_are_taken(fixed_models):
    runner, spec = open_model(fixed_models["nano-ocr"])
    image = word_image("HOTEL", 110, 32, "RGB")
    with Recognizer(runner, spec) as recognizer:
        from_bytes, from_pil, from_array, from_grey, bad = recognizer(
            [encode(image), image, np.asarray(image), np.asarray(image.convert("L")),
             np.zeros((4, 4, 2), np.uint8)])
    assert from_bytes.text == from_pil.text == from_array.text
    assert from_grey.text == from_bytes.text  # grey model: RGB and L give the same luma
    assert isinstance(bad, Failure) and "uint8 [H, W] or [H, W, 3]" in bad.reason


def test_batches_are_split_to_the_engine_range(tmp_path, monkeypatch, fixed_models):
    """An .om built for batches 1~2 (ais_bench TEST DOUBLE in tests/infer/fake_ais_bench)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "infer" / "fake_ais_bench"))
    from ais_bench.infer.interface import InferSession

    source = fixed_models["nano-ocr"]
    runner, spec = open_model(source)
    om = tmp_path / "nano.om"
    shutil.copy(source, om)
    plan = plan_shape("Ascend310P3", spec.input_name, spec.channels, spec.height, max_batch=2,
                      min_width=96, max_width=192)
    write_sidecar(om, plan, spec, "Ascend310P3", ["atc"], source)
    images = [encode(word_image(w, 120, 32)) for w in ("one", "two", "six", "ten", "red")]
    InferSession.calls.clear()
    with Recognizer(*open_model(om)) as on_npu, Recognizer(runner, spec) as on_cpu:
        assert [r.text for r in on_npu(images)] == [r.text for r in on_cpu(images)]
    shapes = [c["shape"] for c in InferSession.calls if c["call"] == "infer"]
    assert [s[0] for s in shapes] == [2, 2, 1]


def test_bad_settings_are_refused(fixed_models):
    runner, spec = open_model(fixed_models["nano-ocr"])
    for kwargs, message in [({"decoder": "viterbi"}, "decoder 'viterbi' is unknown"),
                            ({"beam_width": 0}, "beam width must be >= 1"),
                            ({"batch_size": 0}, "batch size must be >= 1")]:
        with pytest.raises(ToolchainError, match=message):
            Recognizer(runner, spec, **kwargs)


class _MeetingRunner(OnnxRuntimeRunner):
    """The real ONNX Runtime runner whose first two engine calls must meet: each waits (at
    most 20 s) until the other has started, so they can only finish if they run at once."""

    def __init__(self, path):
        super().__init__(path, threads=1)
        self.meeting = threading.Barrier(2, timeout=20)
        self.calls = 0
        self.lock = threading.Lock()

    def _infer(self, feed):
        with self.lock:
            self.calls += 1
            first_two = self.calls <= 2
        if first_two:
            self.meeting.wait()  # BrokenBarrierError if the lanes do not overlap
        return super()._infer(feed)


def test_engine_lanes_run_batches_at_once_with_the_same_results(fixed_models):
    words = ["cat", "house", "elephants", "a", "tiger", "zebra", "river", "moon", "sunshine",
             "the", "on", "mountain", "kitchen", "pencil"]
    images = [encode(word_image(w, 24 + 14 * len(w), 32)) for w in words]
    runner, spec = open_model(fixed_models["nano-ocr"])
    with Recognizer(runner, spec, batch_size=2) as one_lane:
        expected = one_lane(images)
    lanes_runner = _MeetingRunner(fixed_models["nano-ocr"])
    with Recognizer(lanes_runner, spec, batch_size=2, lanes=2) as two_lanes:
        got = two_lanes(images)
        assert lanes_runner.calls >= 7  # 14 images in batches of at most 2
        # closing the loop early leaves no lane running and the recogniser usable
        batches = ((i, batch, [batch.shape[3]] * batch.shape[0]) for i, batch in enumerate(
            np.zeros(spec.input_shape(1, 100), np.float32)[None].repeat(6, 0)))
        loop = two_lanes.recognise_batches(batches)
        assert next(loop).key == 0
        loop.close()
        assert [r.text for r in two_lanes(images[:3])] == [r.text for r in expected[:3]]
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.confidence for r in got] == pytest.approx([r.confidence for r in expected],
                                                        abs=1e-6)
    assert [r.char_frames for r in got] == [r.char_frames for r in expected]


def test_lanes_are_refused_where_the_engine_runs_one_batch_at_a_time(nano_weights):
    runner, spec = open_model(nano_weights, arch="nano-ocr")
    with pytest.raises(ToolchainError, match="torch backend runs one batch at a time"):
        Recognizer(runner, spec, lanes=2)
    with pytest.raises(ToolchainError, match="engine lanes must be >= 1"):
        Recognizer(runner, spec, lanes=0)


@pytest.mark.skipif(not IIIT5K.is_dir(), reason=f"IIIT5K lmdb not found at {IIIT5K}")
def test_ppocr_v4_rec_reads_real_words():
    """The foreign recogniser through the same interface: BGR, height 48, [N, T, C] output."""
    from models.weights import fetch

    runner, spec = open_model(fetch("ppocr-v4-rec"))
    assert (spec.input_name, spec.channels, spec.height, spec.output_layout) == ("x", 3, 48, "NTC")
    env = open_lmdb(IIIT5K)
    with env.begin() as txn:
        samples = [read_sample(txn, i) for i in range(1, 41)]
    env.close()
    with Recognizer(runner, spec) as recognizer:
        results = recognizer([s.image for s in samples])
    correct = sum(r.text.lower() == s.label.decode().lower() for r, s in zip(results, samples))
    assert correct >= 34  # 0.905 over all 3000; 40 words leave room for chance
    assert all(isinstance(r, Recognition) and 0 < r.confidence <= 1 for r in results)
    image = Image.open(__import__("io").BytesIO(samples[0].image))
    assert results[0].size == image.size
