"""Our side of the ais_bench contract, against the documented test double in fake_ais_bench/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.errors import ToolchainError
from convert.atc import plan_shape
from infer import AisBenchRunner, OnnxRuntimeRunner
from models.onnx_file import read_onnx_spec
from models.sidecar import write_sidecar
from tests.conftest import IIIT5K

FAKE = Path(__file__).parent / "fake_ais_bench"


@pytest.fixture
def fake_ais_bench(monkeypatch):
    """Make `import ais_bench.infer.interface` find the test double; return its session class."""
    monkeypatch.syspath_prepend(str(FAKE))
    from ais_bench.infer.interface import InferSession

    InferSession.calls.clear()
    yield InferSession


def _om(tmp_path, onnx_path, shape):
    """A stand-in .om (the ONNX bytes, which the double loads) with convert.atc's sidecar."""
    om = tmp_path / "nano_linux_x86_64.om"
    shutil.copy(onnx_path, om)
    write_sidecar(om, shape, read_onnx_spec(onnx_path), "Ascend310P3", ["atc"], onnx_path)
    return om


def _plan(soc, **kwargs):
    return plan_shape(soc, "imgs", 1, 32, min_accepted_width=4, **kwargs)


def _reference(onnx_path, imgs):
    with OnnxRuntimeRunner(onnx_path) as runner:
        return runner.infer({"imgs": imgs})["output1"]


def test_dymshape_with_custom_sizes_from_output(tmp_path, fake_ais_bench, fixed_models):
    onnx_path = fixed_models["nano-ocr"]
    om = _om(tmp_path, onnx_path, _plan("Ascend310P3", min_width=96, max_width=192))
    imgs = np.random.default_rng(0).uniform(-1, 1, (5, 1, 32, 150)).astype(np.float32)
    with AisBenchRunner(om, device_id=3) as runner:
        logits = runner.infer({"imgs": imgs})["output1"]
        with pytest.raises(ToolchainError, match="outside the model's range 96~192"):
            runner.infer({"imgs": np.zeros((1, 1, 32, 200), np.float32)})
        with pytest.raises(ToolchainError, match="outside the model's range 1~16"):
            runner.infer({"imgs": np.zeros((17, 1, 32, 100), np.float32)})
    np.testing.assert_allclose(logits, _reference(onnx_path, imgs), atol=1e-6)
    init, call, free = fake_ais_bench.calls
    assert init == {"call": "init", "device_id": 3, "model": str(om)}
    assert call["mode"] == "dymshape" and call["shape"] == (5, 1, 32, 150)
    assert call["custom_sizes"] == (150 // 4 + 1) * 5 * 66 * 4  # exactly the largest output
    assert free == {"call": "free_resource"}


def test_dymdims_pads_to_gear_and_batch_then_crops(tmp_path, fake_ais_bench, fixed_models):
    onnx_path = fixed_models["nano-ocr"]
    shape = _plan("Ascend310", max_batch=4, width_gears=[96, 128, 192])
    om = _om(tmp_path, onnx_path, shape)
    imgs = np.random.default_rng(1).uniform(-1, 1, (6, 1, 32, 128)).astype(np.float32)
    with AisBenchRunner(om) as runner:
        logits = runner.infer({"imgs": imgs})["output1"]
        narrow = runner.infer({"imgs": imgs[:1, :, :, :100]})["output1"]
    calls = [c for c in fake_ais_bench.calls if c["call"] == "infer"]
    assert [c["shape"] for c in calls] == [(4, 1, 32, 128)] * 2 + [(4, 1, 32, 128)]
    assert all(c["mode"] == "dymdims" for c in calls)
    assert logits.shape == (33, 6, 66)  # batch padding dropped
    np.testing.assert_allclose(logits, _reference(onnx_path, imgs), atol=1e-6)
    assert narrow.shape == (26, 1, 66)  # width 100 ran at gear 128, frames cropped to 100 // 4 + 1


def test_missing_ais_bench_is_explained(tmp_path, fixed_models, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ais_bench" else real(name, *a))
    om = _om(tmp_path, fixed_models["nano-ocr"], _plan("Ascend310P3"))
    with pytest.raises(ToolchainError, match="ais-bench-benchmark"):
        AisBenchRunner(om).load()


def test_missing_sidecar_is_explained(tmp_path, fake_ais_bench, fixed_models):
    om = tmp_path / "x.om"
    shutil.copy(fixed_models["nano-ocr"], om)
    with pytest.raises(ToolchainError, match="no sidecar JSON beside x.om"):
        AisBenchRunner(om).load()
    om.with_suffix(".json").write_text(json.dumps({"mode": "cone"}))
    with pytest.raises(ToolchainError, match="lacks the model description"):
        AisBenchRunner(om).load()
    sidecar = {
        "mode": "cone",
        "inputs": [],
        "model": read_onnx_spec(fixed_models["nano-ocr"]).to_dict(),
    }
    om.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ToolchainError, match="mode must be range or gears"):
        AisBenchRunner(om).load()


def _om_for(tmp_path, onnx_path, plan, name="nano"):
    om = tmp_path / f"{name}.om"
    shutil.copy(onnx_path, om)
    write_sidecar(om, plan, read_onnx_spec(onnx_path), "Ascend310P3", ["atc"], onnx_path)
    return om


def test_widths_outside_the_om_range_are_refused_before_inference(tmp_path, fake_ais_bench,
                                                                  tiny_lmdb, exported,
                                                                  fixed_models, capsys):
    from eval import postprocess
    from preprocess import parse_testdata

    om = _om_for(tmp_path, fixed_models["nano-ocr"],
                 _plan("Ascend310P3", max_batch=4, min_width=96, max_width=192))
    wide = tmp_path / "wide"
    assert parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(wide),
                                "--arch", "nano-ocr", "--max-width", "400", "--workers", "1"]) == 0
    fake_ais_bench.calls.clear()
    assert postprocess.main(["--input-npy", str(wide), "--om-path", str(om)]) == 1
    err = capsys.readouterr().err
    assert "outside the model's width range 96~192" in err and "--max-width" in err
    assert not [c for c in fake_ais_bench.calls if c["call"] == "infer"]  # nothing ran


def test_batches_above_the_om_range_are_split_and_agree(tmp_path, fake_ais_bench, tiny_lmdb,
                                                        fixed_models):
    from eval import compare, postprocess

    om = _om_for(tmp_path, fixed_models["nano-ocr"],
                 _plan("Ascend310P3", max_batch=2, min_width=96, max_width=192))
    runs = {}
    for name, model in (("om", ["--om-path", str(om)]),
                        ("onnx", ["--onnx-path", str(fixed_models["nano-ocr"])])):
        runs[name] = tmp_path / f"{name}.csv"
        assert postprocess.main(["--test-dir", str(tiny_lmdb), "--batch-size", "16", *model,
                                 "--predictions", str(runs[name])]) == 0
    result = compare.compare(compare.read_predictions(runs["om"]),
                             compare.read_predictions(runs["onnx"]))
    assert result["common"] == 7 and result["differ"] == 0
    assert max(c["shape"][0] for c in fake_ais_bench.calls if c["call"] == "infer") == 2


def test_gear_models_get_inputs_of_exactly_their_widths(tmp_path, fake_ais_bench, tiny_lmdb,
                                                        fixed_models):
    from eval import compare, postprocess
    from infer import describe
    from preprocess import parse_testdata

    gears = [96, 112, 128, 144, 160, 176, 192]
    om = _om_for(tmp_path, fixed_models["nano-ocr"],
                 _plan("Ascend310", max_batch=4, width_gears=gears), name="nano_gears")
    assert describe(om).width_gears == tuple(gears)  # the sidecar carries the compiled widths
    inputs = tmp_path / "inputs"
    assert parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(inputs),
                                "--model", str(om), "--workers", "1"]) == 0
    manifest = json.loads((inputs / "manifest.json").read_text())
    assert {s["width"] for s in manifest["samples"]} <= set(gears)
    fake_ais_bench.calls.clear()
    runs = {}
    for name, model in (("om", ["--om-path", str(om)]),
                        ("onnx", ["--onnx-path", str(fixed_models["nano-ocr"])])):
        runs[name] = tmp_path / f"{name}.csv"
        assert postprocess.main(["--input-npy", str(inputs), *model,
                                 "--predictions", str(runs[name])]) == 0
    widths = {c["shape"][3] for c in fake_ais_bench.calls if c["call"] == "infer"}
    assert widths <= set(gears)
    samples = {s["width"] for s in manifest["samples"]}
    assert widths == samples  # each batch ran at its own width: no width padding
    result = compare.compare(compare.read_predictions(runs["om"]),
                             compare.read_predictions(runs["onnx"]))
    assert result["common"] == 7 and result["differ"] == 0


@pytest.mark.skipif(not IIIT5K.is_dir(), reason=f"IIIT5K lmdb not found at {IIIT5K}")
def test_iiit5k_on_gear_widths_stays_within_0_2_points(tmp_path, fixed_models):
    """Inputs snapped to ATC's default gears (96..192 by 16) score within 0.2 pt of any width."""
    from eval.evaluate import run_evaluation
    from eval.inputs import load_input_set
    from eval.metrics import recognition_metrics
    from pipeline import Recognizer
    from preprocess.parse_testdata import write_inputs

    accuracy = {}
    for name, gears in (("range", ()), ("gears", tuple(range(96, 193, 16)))):
        spec = read_onnx_spec(fixed_models["nano-ocr"]).replace(width_gears=gears)
        write_inputs(IIIT5K, tmp_path / name, spec, workers=2)
        with Recognizer(OnnxRuntimeRunner(fixed_models["nano-ocr"]), spec) as recognizer:
            run = run_evaluation(recognizer, load_input_set(tmp_path / name))
        accuracy[name] = recognition_metrics([p.prediction for p in run.predictions],
                                             [p.label for p in run.predictions])["accuracy"]
    assert accuracy["range"] >= 0.792 and accuracy["gears"] >= accuracy["range"] - 0.002
