"""The runner contract, checked the same way for every backend (Polygraphy's ``check_runner``),
plus what is particular to ONNX Runtime and PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.errors import EngineError, ToolchainError
from convert.atc import plan_shape
from infer import AisBenchRunner, OnnxRuntimeRunner, Runner, TorchRunner, runner_class
from models.backends import BACKENDS
from models.onnx_file import read_onnx_spec
from models.registry import spec_for_arch
from models.sidecar import write_sidecar

FAKE_AIS_BENCH = Path(__file__).parent / "fake_ais_bench"


def test_backends_table():
    runners = {name: runner_class(row) for name, row in BACKENDS.items()}
    assert runners == {"onnxruntime": OnnxRuntimeRunner, "ais_bench": AisBenchRunner,
                       "torch": TorchRunner}
    for name, runner in runners.items():
        assert issubclass(runner, Runner) and runner.name == name and runner.requires
    assert runners["onnxruntime"].is_available() and runners["torch"].is_available()
    assert {suffix for row in BACKENDS.values() for suffix in row.suffixes} == {
        ".onnx", ".om", ".pth", ".pt"}


@pytest.fixture(params=["onnxruntime", "torch", "ais_bench"])
def any_runner(request, tmp_path, monkeypatch, crnn_checkpoints, fixed_models):
    """(runner, its model's description) for every backend, on the same crnn weights.

    ais_bench runs through the documented TEST DOUBLE in fake_ais_bench/ (ONNX Runtime
    behind ais_bench's interface), with a range plan from convert.atc.
    """
    onnx_path = fixed_models["crnn-meijieru"]
    spec = read_onnx_spec(onnx_path)
    if request.param == "onnxruntime":
        return OnnxRuntimeRunner(onnx_path), spec
    if request.param == "torch":
        return TorchRunner(crnn_checkpoints["meijieru"], spec_for_arch("crnn")), spec
    monkeypatch.syspath_prepend(str(FAKE_AIS_BENCH))
    om = tmp_path / "crnn.om"
    shutil.copy(onnx_path, om)
    plan = plan_shape("Ascend310P3", spec.input_name, spec.channels, spec.height,
                      max_batch=8, min_width=32, max_width=320)
    write_sidecar(om, plan, spec, "Ascend310P3", ["atc"], onnx_path)
    return AisBenchRunner(om), spec


def test_runner_contract(any_runner):
    runner, spec = any_runner
    with pytest.raises(ToolchainError, match="call load"):
        runner.infer({})
    with runner:
        (input_spec,) = runner.input_specs()
        assert input_spec.name == spec.input_name and input_spec.dtype == np.float32
        assert input_spec.shape[1:3] == (spec.channels, spec.height)
        images = (
            np.random.default_rng(0).uniform(-1, 1, spec.input_shape(3, 100)).astype(np.float32)
        )
        outputs = runner.infer({spec.input_name: images})
        assert list(outputs) == [spec.output_name]
        assert outputs[spec.output_name].shape == spec.output_shape(3, 100)
        assert outputs[spec.output_name].dtype == np.float32
        assert runner.last_engine_seconds > 0
        again = runner.infer({spec.input_name: images[1:2]})[spec.output_name]
        np.testing.assert_allclose(again[:, 0], outputs[spec.output_name][:, 1], atol=1e-5)
        for feed, message in [
            ({"images": images}, f"input 'images' not in the model; inputs are: {spec.input_name}"),
            (
                {spec.input_name: images.astype(np.float64)},
                "dtype float64; the model takes float32",
            ),
            ({spec.input_name: images[0]}, "rank 4"),
            (
                {spec.input_name: np.zeros((1, 3, 32, 64), np.float32)},
                "has 3 on axis 1; the model takes 1",
            ),
            ({}, "missing from the feed"),
        ]:
            with pytest.raises(ToolchainError, match=message):
                runner.infer(feed)
    assert not runner.loaded
    runner.close()  # closing twice is harmless


def test_engine_errors_become_engine_error(any_runner, monkeypatch):
    runner, spec = any_runner
    with runner:
        error = runner.engine_errors[0]

        def failing(feed):
            raise error("the device ran out of memory\nsecond line")

        monkeypatch.setattr(runner, "_infer", failing)
        with pytest.raises(
            EngineError, match=f"{runner.name}: {error.__name__}: the device ran out of memory$"
        ):
            runner.infer({spec.input_name: np.zeros(spec.input_shape(1, 64), np.float32)})


def test_onnxruntime_and_torch_agree(crnn_checkpoints, fixed_models):
    images = np.random.default_rng(0).uniform(-1, 1, (3, 1, 32, 100)).astype(np.float32)
    spec = spec_for_arch("crnn")
    with OnnxRuntimeRunner(fixed_models["crnn-meijieru"]) as ort_runner:
        from_ort = ort_runner.infer({spec.input_name: images})[spec.output_name]
    with TorchRunner(crnn_checkpoints["meijieru"], spec) as torch_runner:
        from_torch = torch_runner.infer({spec.input_name: images})[spec.output_name]
    assert from_ort.shape == from_torch.shape == (26, 3, 37)
    np.testing.assert_allclose(from_ort, from_torch, atol=1e-4)


def test_infer_before_load_and_bad_paths(tmp_path):
    runner = OnnxRuntimeRunner(tmp_path / "none.onnx")
    with pytest.raises(ToolchainError, match="no such ONNX model"):
        runner.load()
    with pytest.raises(ToolchainError, match="device 'tpu' is unknown"):
        OnnxRuntimeRunner(tmp_path / "none.onnx", device="tpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ToolchainError, match="ONNX Runtime cannot load it"):
        OnnxRuntimeRunner(junk).load()


def test_cuda_provider_missing_is_explained(fixed_models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ToolchainError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(fixed_models["nano-ocr"], device="cuda").load()
