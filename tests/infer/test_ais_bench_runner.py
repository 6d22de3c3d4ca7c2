"""Our side of the ais_bench contract, against the documented test double in fake_ais_bench/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.atc import plan_shape, write_sidecar
from convert.errors import ToolchainError
from convert.spec import read_onnx_spec
from infer import AisBenchRunner, OnnxRuntimeRunner

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
