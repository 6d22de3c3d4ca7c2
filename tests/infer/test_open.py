"""Opening a model by its file: suffix -> backend, description, devices."""

from __future__ import annotations

import json
import shutil

import pytest

from common.errors import ToolchainError
from convert.atc import plan_shape
from infer import AisBenchRunner, OnnxRuntimeRunner, TorchRunner, describe, open_model, parse_device
from infer.open import Device
from models.onnx_file import read_onnx_spec
from models.sidecar import write_sidecar


@pytest.mark.parametrize(
    ("text", "device", "ordinal"),
    [("cpu", Device("cpu"), 0), ("cuda", Device("cuda"), 0), ("cuda:1", Device("cuda", 1), 1),
     ("npu", Device("npu"), 0), ("npu:3", Device("npu", 3), 3), ("2", Device("npu", 2), 2),
     (" cpu ", Device("cpu"), 0)],
)
def test_device_spellings(text, device, ordinal):
    parsed = parse_device(text)
    assert parsed == device and parsed.ordinal == ordinal
    assert parse_device(str(parsed)) == parsed  # what a message prints reads back the same


@pytest.mark.parametrize(("text", "message"), [
    *[(text, "use cpu, cuda, cuda:N, npu or npu:N") for text in
      ["gpu", "CPU", "npu:x", "cuda:", "-1", "", "npu:1,2"]],
    ("cpu:0", "the CPU takes no index"),
])
def test_bad_device_spellings(text, message):
    with pytest.raises(ToolchainError, match=message):
        parse_device(text)


def test_an_indexed_gpu_reaches_its_engine(fixed_models, crnn_checkpoints):
    """cuda:N is the CUDA execution provider's device_id N and torch's cuda:N; without CUDA
    here, loading says so in one line (the index checks need a GPU, not lent here)."""
    onnx_runner, _ = open_model(fixed_models["nano-ocr"], "cuda:1")
    assert onnx_runner.device == "cuda:1" and onnx_runner._device.ordinal == 1
    torch_runner, _ = open_model(crnn_checkpoints["modelzoo"], " cuda:1 ", arch="crnn",
                                 gate_order="igfo")
    assert torch_runner.device == "cuda:1"
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ToolchainError, match="CUDAExecutionProvider is not available"):
            onnx_runner.load()
    if not torch.cuda.is_available():
        with pytest.raises(ToolchainError, match="device cuda:1 asked for, but torch sees no"):
            torch_runner.load()


def test_the_cuda_provider_gets_the_gpu_index(monkeypatch, fixed_models):
    """Our side of ONNX Runtime's provider options, with a TEST DOUBLE standing in for an
    onnxruntime-gpu session (no GPU here): ``cuda:N`` is ``("CUDAExecutionProvider",
    {"device_id": N})``, bare ``cuda`` device 0; the CPU provider gets no options."""
    import onnxruntime

    seen = []

    class SessionDouble:  # TEST DOUBLE for onnxruntime.InferenceSession
        def __init__(self, path, options, providers):
            seen.append(providers)

        def get_outputs(self):
            return []

    monkeypatch.setattr(onnxruntime, "InferenceSession", SessionDouble)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for device in ("cuda:1", "cuda", "cpu"):
        open_model(fixed_models["nano-ocr"], device)[0].load()
    assert seen == [[("CUDAExecutionProvider", {"device_id": 1})],
                    [("CUDAExecutionProvider", {"device_id": 0})], ["CPUExecutionProvider"]]


def test_onnx_opens_on_onnxruntime_with_its_description(fixed_models):
    runner, spec = open_model(fixed_models["nano-ocr"], threads=1)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.threads == 1 and runner.device == "cpu"
    assert spec == read_onnx_spec(fixed_models["nano-ocr"]) and not runner.loaded
    with pytest.raises(ToolchainError,
                       match=r"takes device cpu or cuda\[:N\], not npu:0; build an .om"):
        open_model(fixed_models["nano-ocr"], "npu:0")


def test_checkpoint_needs_its_architecture(crnn_checkpoints):
    with pytest.raises(ToolchainError, match=r"give its architecture \(--arch\)"):
        open_model(crnn_checkpoints["meijieru"])
    runner, spec = open_model(crnn_checkpoints["modelzoo"], arch="crnn", gate_order="igfo")
    assert isinstance(runner, TorchRunner) and spec.arch == "crnn"
    with runner:
        assert runner.model.layout == "modelzoo"  # detected from the keys


def test_om_opens_on_ais_bench_from_its_sidecar(tmp_path, fixed_models):
    source = fixed_models["nano-ocr"]
    spec = read_onnx_spec(source)
    om = tmp_path / "nano.om"
    shutil.copy(source, om)
    plan = plan_shape("Ascend310P3", spec.input_name, spec.channels, spec.height)
    sidecar = write_sidecar(om, plan, spec, "Ascend310P3", ["atc"], source)
    runner, described = open_model(om, "npu:5")
    assert isinstance(runner, AisBenchRunner) and runner.device_id == 5 and described == spec
    assert open_model(om)[0].device_id == 0  # an .om defaults to npu:0
    assert describe(sidecar) == spec  # parse_testdata --model takes the sidecar too
    with pytest.raises(ToolchainError, match=r"takes device npu\[:N\], not cpu"):
        open_model(om, "cpu")
    json.loads(sidecar.read_text())  # still a plain JSON file


def test_unknown_files(tmp_path):
    with pytest.raises(ToolchainError, match="no such model file"):
        describe(tmp_path / "missing.onnx")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(
        ToolchainError, match="unknown model file type '.tflite'; known: .onnx, .om"
    ):
        open_model(tmp_path / "model.tflite")


def test_onnx_without_description_uses_arch_or_fallback(tmp_path, fixed_models):
    import onnx

    bare = onnx.load(str(fixed_models["crnn-meijieru"]))
    del bare.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(bare, str(path))
    with pytest.raises(ToolchainError, match="carries no model description"):
        describe(path)
    assert describe(path, arch="crnn").arch == "crnn"
    fallback = read_onnx_spec(fixed_models["crnn-meijieru"]).replace(width=120)
    assert describe(path, fallback=fallback) == fallback
