"""Export to ONNX: both architectures, both crnn layouts, the real weights, and the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from common.errors import ToolchainError
from convert import pth2onnx
from models.checkpoint import load_checkpoint
from models.onnx_file import read_onnx_spec
from models.registry import spec_for_arch


def _input_dims(path):
    graph = onnx.load(str(path)).graph
    (value,) = graph.input
    return value.name, [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("layout", ["meijieru", "modelzoo"])
def test_crnn_export_matches_torch(tmp_path, crnn_checkpoints, layout):
    spec = spec_for_arch("crnn")
    model = load_checkpoint(crnn_checkpoints[layout], spec,
                            gate_order="igfo" if layout == "modelzoo" else "ifgo")
    path = pth2onnx.export_onnx(model, spec, tmp_path / "crnn.onnx")
    results = pth2onnx.check_parity(model, path, spec, pth2onnx.parity_pairs(spec))
    assert [(b, w) for b, w, _ in results] == [(1, 32), (2, 100), (3, 320), (1, 57)]
    assert max(d for *_, d in results) < 1e-4
    assert _input_dims(path) == ("imgs", ["batch", 1, 32, "width"])
    assert read_onnx_spec(path) == spec


def test_nano_ocr_real_weights_cli(tmp_path, nano_weights, capsys):
    out = tmp_path / "nano.onnx"
    assert pth2onnx.main([str(nano_weights), str(out), "--arch", "nano-ocr"]) == 0
    printed = capsys.readouterr().out
    assert "parity batch=1 width=32" in printed and "width=320" in printed
    spec = read_onnx_spec(out)
    assert spec.arch == "nano-ocr" and spec.alphabet.endswith(".- ") and spec.width == 128
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"imgs": np.zeros((4, 1, 32, 200), np.float32)})
    assert logits.shape == (51, 4, 66)


def test_parity_failure_is_reported(tmp_path, crnn_checkpoints):
    spec = spec_for_arch("crnn")
    model = load_checkpoint(crnn_checkpoints["meijieru"], spec)
    path = pth2onnx.export_onnx(model, spec, tmp_path / "crnn.onnx")
    with pytest.raises(ToolchainError, match="differs from PyTorch"):
        pth2onnx.check_parity(model, path, spec, [(1, 64)], tolerance=0.0)


def test_opset_option(tmp_path, crnn_checkpoints):
    out = tmp_path / "c13.onnx"
    assert pth2onnx.main([str(crnn_checkpoints["meijieru"]), str(out), "--arch", "crnn",
                          "--opset", "13"]) == 0
    assert onnx.load(str(out)).opset_import[0].version == 13


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.pth", "o.onnx", "--arch", "crnn"], "no such checkpoint file"),
        (
            ["{ckpt}", "o.onnx", "--arch", "vgg"],
            "unknown architecture 'vgg'; known: crnn, crnn-small, nano-ocr, ppocr-v4-rec",
        ),
        (["{ckpt}", "o.onnx", "--arch", "nano-ocr"], "fits --arch crnn --rnn-layout meijieru"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, crnn_checkpoints, capsys, args, message):
    args = [a.format(ckpt=crnn_checkpoints["meijieru"]) for a in args]
    assert pth2onnx.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert any(m in err for m in message.split("|"))
