"""ONNX Runtime and PyTorch runners on a small exported model, and the base class's checks."""

from __future__ import annotations

import numpy as np
import pytest

from convert.errors import ToolchainError
from convert.registry import spec_for_arch
from infer import BACKENDS, OnnxRuntimeRunner, TorchRunner


def test_backends_table():
    assert set(BACKENDS) == {"onnxruntime", "ais_bench", "torch"}
    assert BACKENDS["onnxruntime"].is_available() and BACKENDS["torch"].is_available()


def test_onnxruntime_and_torch_agree(crnn_checkpoints, fixed_models):
    imgs = np.random.default_rng(0).uniform(-1, 1, (3, 1, 32, 100)).astype(np.float32)
    with OnnxRuntimeRunner(fixed_models["crnn-meijieru"]) as ort_runner:
        from_ort = ort_runner.infer({"imgs": imgs})["output1"]
        assert ort_runner.last_engine_seconds > 0
    with TorchRunner(crnn_checkpoints["meijieru"], spec_for_arch("crnn")) as torch_runner:
        from_torch = torch_runner.infer({"imgs": imgs})["output1"]
    assert from_ort.shape == from_torch.shape == (26, 3, 37)
    np.testing.assert_allclose(from_ort, from_torch, atol=1e-4)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"images": np.zeros((1, 1, 32, 64), np.float32)}, "input 'images' not in the model; inputs are: imgs"),
        ({"imgs": np.zeros((1, 1, 32, 64), np.float64)}, "dtype float64; the model takes float32"),
        ({"imgs": np.zeros((1, 32, 64), np.float32)}, "rank 4"),
        ({"imgs": np.zeros((1, 3, 32, 64), np.float32)}, "has 3 on axis 1; the model takes 1"),
        ({}, "missing from the feed"),
    ],
)
def test_feed_checks(fixed_models, feed, message):
    with OnnxRuntimeRunner(fixed_models["nano-ocr"]) as runner:
        with pytest.raises(ToolchainError, match=message):
            runner.infer(feed)


def test_infer_before_load_and_bad_paths(tmp_path):
    runner = OnnxRuntimeRunner(tmp_path / "none.onnx")
    with pytest.raises(ToolchainError, match="call load"):
        runner.infer({})
    with pytest.raises(ToolchainError, match="no such ONNX model"):
        runner.load()
    with pytest.raises(ToolchainError, match="device 'tpu' is unknown"):
        OnnxRuntimeRunner(tmp_path / "none.onnx", device="tpu")


def test_cuda_provider_missing_is_explained(fixed_models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ToolchainError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(fixed_models["nano-ocr"], device="cuda").load()
