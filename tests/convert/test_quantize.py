"""convert.quantize: int8 QDQ models from real exports, calibrated on real or tiny lmdbs."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from common.errors import ToolchainError
from convert import atc, quantize
from eval import compare, postprocess
from infer.onnxruntime_runner import OnnxRuntimeRunner
from models.onnx_file import read_onnx_spec
from models.spec import QUANTIZATION_METADATA_KEY, batch_dependent
from preprocess import parse_testdata
from preprocess.lmdb_reader import default_calibration_set
from tests.conftest import IIIT5K

CALIBRATION = default_calibration_set()
real_data = pytest.mark.skipif(not (IIIT5K.is_dir() and CALIBRATION.is_dir()),
                               reason=f"IIIT5K lmdbs not found at {IIIT5K} / {CALIBRATION}")


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_calibration_set_records_every_skipped_sample(tiny_lmdb, exported):
    spec = read_onnx_spec(exported["nano-ocr"])
    calibration = quantize.load_calibration_set(tiny_lmdb, spec, batch_size=4)
    # 10 indices claimed: 7 corrupt, 8 without label, 10 absent; the other 7 are used.
    assert calibration.used == 7 == sum(len(b) for b in calibration.batches)
    assert [f["index"] for f in calibration.failed] == [7, 8, 10]
    assert all(f["reason"] for f in calibration.failed)
    for batch in calibration.batches:
        assert batch.dtype == np.float32 and batch.shape[1:3] == (1, 32) and len(batch) <= 4
    assert quantize.load_calibration_set(tiny_lmdb, spec, samples=3).used == 3


def test_quantised_model_keeps_the_description_and_records_its_settings(tmp_path, tiny_lmdb,
                                                                       exported, fixed_models):
    source = fixed_models["nano-ocr"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source))
    result = quantize.quantize_model(source, tmp_path / "int8.onnx", calibration, min_agreement=0.0)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert (result.source_opset, result.opset) == (11, 13)
    assert read_onnx_spec(tmp_path / "int8.onnx") == read_onnx_spec(source)
    recorded = json.loads({p.key: p.value for p in model.metadata_props}[QUANTIZATION_METADATA_KEY])
    assert recorded["calibration_samples"] == 7 and recorded["calibration_failed"] == 3
    assert recorded["per_channel"] is True and recorded["reduce_range"] is True
    assert recorded["lstm"] == "fp32" and not batch_dependent(model)
    ops = _ops(tmp_path / "int8.onnx")
    # Every convolution and the classifier MatMul read dequantised int8 weights; LSTMs stay fp32.
    assert ops["QuantizeLinear"] >= 7 and ops["DequantizeLinear"] >= 14
    assert ops["Conv"] == 6 and ops["LSTM"] == 1
    # Dynamic batch and width survive: the int8 model runs at widths not seen in calibration.
    with OnnxRuntimeRunner(tmp_path / "int8.onnx") as runner:
        for batch, width in ((1, 40), (3, 257)):
            logits = runner.infer({"imgs": np.zeros((batch, 1, 32, width), np.float32)})["output1"]
            assert logits.shape == (width // 4 + 1, batch, 66)


def test_int8_lstm_is_opt_in_and_checked(tmp_path, tiny_lmdb, fixed_models, capsys, caplog):
    source = fixed_models["nano-ocr"]
    output = tmp_path / "int8_lstm.onnx"
    assert quantize.main([str(source), str(output), "--calibration", str(tiny_lmdb),
                          "--lstm", "int8", "--min-agreement", "0.9"]) == 0
    assert "int8 LSTM" in capsys.readouterr().out
    # ONNX Runtime's "already quantized?" warning about the static pass's own QDQ nodes is
    # noise to the user: the second pass quantises only the LSTM, on purpose.
    assert "already quantized" not in caplog.text
    ops = _ops(output)
    assert ops["DynamicQuantizeLSTM"] == 1 and "LSTM" not in ops
    model = onnx.load(str(output))
    recorded = json.loads({p.key: p.value for p in model.metadata_props}[QUANTIZATION_METADATA_KEY])
    assert recorded["lstm"].startswith("int8") and recorded["agreement"] >= 0.9
    assert batch_dependent(model)
    with pytest.raises(ToolchainError, match="LSTM precision 'int4' is unknown"):
        quantize.quantize_model(source, tmp_path / "x.onnx", None, lstm="int4")


def _conv_weight_channels(path) -> list[int]:
    """Input channels of every 4-D int8 weight initializer (the convolutions), in graph order."""
    model = onnx.load(str(path))
    weights = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return [weights[n.input[0]].dims[1] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in weights
            and len(weights[n.input[0]].dims) == 4]


def test_first_convolution_is_padded_to_four_channels_without_changing_a_bit(
        tmp_path, tiny_lmdb, fixed_models):
    source = fixed_models["nano-ocr"]
    spec = read_onnx_spec(source)
    calibration = quantize.load_calibration_set(tiny_lmdb, spec)
    padded, plain = tmp_path / "padded.onnx", tmp_path / "plain.onnx"
    assert quantize.quantize_model(source, padded, calibration, min_agreement=0.0,
                                   lstm="int8").padded_convs == 1
    assert quantize.quantize_model(source, plain, calibration, min_agreement=0.0, lstm="int8",
                                   pad_channels=False).padded_convs == 0
    before, after = _conv_weight_channels(plain), _conv_weight_channels(padded)
    assert before[0] == 1 and after == [4] + before[1:] and len(after) == 6
    assert _ops(padded)["Pad"] == 1 and _ops(plain)["Pad"] == 0
    recorded = json.loads({p.key: p.value for p in onnx.load(str(padded)).metadata_props}[
        QUANTIZATION_METADATA_KEY])
    assert recorded["padded_convs"] == 1
    # The model still takes one grey channel, and computes exactly what it did.
    assert read_onnx_spec(padded) == spec
    rng = np.random.default_rng(0)
    batches = calibration.batches + [rng.uniform(-1, 1, (3, 1, 32, w)).astype(np.float32)
                                     for w in (40, 131)]
    with OnnxRuntimeRunner(padded) as a, OnnxRuntimeRunner(plain) as b:
        for batch in batches:
            assert np.array_equal(a.infer({"imgs": batch})["output1"],
                                  b.infer({"imgs": batch})["output1"])
    # A second pass finds nothing left to pad.
    assert quantize.pad_conv_input_channels(gs.import_onnx(onnx.load(str(padded)))) == 0


def _qdq_conv_graph(channels: int, weight_zero_point: int) -> onnx.ModelProto:
    """x [N, channels, 8, 8] -> Q/DQ -> Conv(16 filters, 3x3, int8 weights behind a DQ) -> y."""
    h = onnx.helper
    rng = np.random.default_rng(channels)
    weights = rng.integers(-60, 60, (16, channels, 3, 3), dtype=np.int8)
    inits = [
        onnx.numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        onnx.numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        onnx.numpy_helper.from_array(weights, "w"),
        onnx.numpy_helper.from_array(np.full(16, 0.01, np.float32), "ws"),
        onnx.numpy_helper.from_array(np.full(16, weight_zero_point, np.int8), "wz"),
    ]
    nodes = [
        h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        h.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = h.make_graph(
        nodes, "qdq_conv",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", channels, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize(("channels", "weight_zero_point", "rewritten"),
                         [(3, 0, 1), (1, 0, 1), (5, 0, 1), (4, 0, 0), (3, 2, 0)])
def test_channel_padding_rule_on_qdq_convolutions(tmp_path, channels, weight_zero_point,
                                                   rewritten):
    """RGB (3) and grey (1) inputs are padded, 5 goes to 8; 4 channels, or asymmetric
    weights (no symmetric kernel to gain), are left alone. Outputs stay bit-identical."""
    model = _qdq_conv_graph(channels, weight_zero_point)
    graph = gs.import_onnx(model)
    assert quantize.pad_conv_input_channels(graph) == rewritten
    onnx.save(model, str(tmp_path / "before.onnx"))
    onnx.save(gs.export_onnx(graph), str(tmp_path / "after.onnx"))
    x = np.random.default_rng(1).uniform(-2, 2, (2, channels, 8, 8)).astype(np.float32)
    with OnnxRuntimeRunner(tmp_path / "before.onnx") as a, \
            OnnxRuntimeRunner(tmp_path / "after.onnx") as b:
        assert np.array_equal(a.infer({"x": x})["y"], b.infer({"x": x})["y"])
    padded = {4: 4, 1: 4, 3: 4, 5: 8}[channels] if rewritten else channels
    assert _conv_weight_channels(tmp_path / "after.onnx") == [padded]


def test_int8_models_are_refused_by_quantize_and_atc(tmp_path, tiny_lmdb, fixed_models, capsys):
    source = fixed_models["nano-ocr"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source), samples=4)
    int8 = tmp_path / "int8.onnx"
    quantize.quantize_model(source, int8, calibration, min_agreement=0.0)
    with pytest.raises(ToolchainError, match="int8.onnx is already an int8 model"):
        quantize.quantize_model(int8, tmp_path / "twice.onnx", calibration)
    assert (
        atc.main(
            [
                "--model",
                str(int8),
                "--output",
                str(tmp_path / "om"),
                "--soc_version",
                "Ascend310P3",
                "--dry-run",
            ]
        )
        == 1
    )
    assert "int8.onnx is an int8 model for ONNX Runtime" in capsys.readouterr().err


def test_per_tensor_quantisation_of_the_modelzoo_graph(tmp_path, tiny_lmdb, fixed_models):
    source = fixed_models["crnn-modelzoo"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source))
    result = quantize.quantize_model(
        source, tmp_path / "crnn_int8.onnx", calibration, per_channel=False, min_agreement=0.95
    )
    assert not result.per_channel
    assert result.agreement >= 0.95 and result.max_abs_output_diff < 0.1
    ops = _ops(tmp_path / "crnn_int8.onnx")
    assert ops["Conv"] == 7 and ops["LSTM"] == 4 and ops["DequantizeLinear"] > 0
    images, spec = calibration.batches[0], read_onnx_spec(source)
    with OnnxRuntimeRunner(source) as fp32, OnnxRuntimeRunner(tmp_path / "crnn_int8.onnx") as int8:
        expected = fp32.infer({spec.input_name: images})[spec.output_name]
        actual = int8.infer({spec.input_name: images})[spec.output_name]
    assert actual.shape == expected.shape
    assert np.mean(actual.argmax(-1) == expected.argmax(-1)) >= 0.95


def test_agreement_below_the_minimum_fails_and_writes_nothing(tmp_path, tiny_lmdb, fixed_models):
    source = fixed_models["nano-ocr"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source))
    with pytest.raises(ToolchainError, match="agrees with fp32 on only .* not written"):
        quantize.quantize_model(source, tmp_path / "int8.onnx", calibration, min_agreement=1.01)
    assert not (tmp_path / "int8.onnx").exists()


def test_cli_errors_name_the_file(tmp_path, tiny_lmdb, fixed_models, capsys):
    bare = onnx.load(str(fixed_models["nano-ocr"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert (
        quantize.main(
            [
                str(tmp_path / "bare.onnx"),
                str(tmp_path / "out.onnx"),
                "--calibration",
                str(tiny_lmdb),
            ]
        )
        == 1
    )
    assert "bare.onnx" in capsys.readouterr().err
    assert (
        quantize.main(
            [
                str(fixed_models["nano-ocr"]),
                str(tmp_path / "out.onnx"),
                "--calibration",
                str(tmp_path / "nowhere"),
            ]
        )
        == 1
    )
    assert "nowhere: not an lmdb folder" in capsys.readouterr().err
    assert (
        quantize.main(
            [
                str(fixed_models["nano-ocr"]),
                str(tmp_path / "out.onnx"),
                "--calibration",
                str(tiny_lmdb),
                "--samples",
                "0",
            ]
        )
        == 1
    )
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


@real_data
def test_iiit5k_int8_keeps_the_reference_accuracy(tmp_path, exported, fixed_models, capsys):
    """Calibrated on IIIT5K train (500), scored on IIIT5K test (3000): the int8 model of the
    default path must keep at least the reference's 0.776 and change few predicted strings."""
    int8 = tmp_path / "nano_int8.onnx"
    assert quantize.main([str(fixed_models["nano-ocr"]), str(int8)]) == 0
    assert "calibration 500 images" in capsys.readouterr().out
    inputs = tmp_path / "inputs"
    assert (
        parse_testdata.main(
            [
                "--test_dir",
                str(IIIT5K),
                "--output_npy",
                str(inputs),
                "--model",
                str(exported["nano-ocr"]),
            ]
        )
        == 0
    )
    for name, model in (("fp32", fixed_models["nano-ocr"]), ("int8", int8)):
        assert (
            postprocess.main(
                [
                    "--input_npy",
                    str(inputs),
                    "--onnx_path",
                    str(model),
                    "--report",
                    str(tmp_path / f"{name}.json"),
                    "--predictions",
                    str(tmp_path / f"{name}.csv"),
                ]
            )
            == 0
        )
    report = json.loads((tmp_path / "int8.json").read_text())
    assert (report["samples"], report["scored"], report["failed"]) == (3000, 3000, 0)
    assert report["accuracy"] >= 0.776
    result = compare.compare(
        compare.read_predictions(tmp_path / "fp32.csv"),
        compare.read_predictions(tmp_path / "int8.csv"),
    )
    # Measured: 130 of 3000 strings change (docs/results/README.md), mostly on words both
    # models get wrong.
    assert result["common"] == 3000 and result["differ"] <= 0.06 * 3000


def test_ppocr_recogniser_quantises_with_its_rgb_convolution_padded(tmp_path, tiny_lmdb,
                                                                    ppocr_rec_path):
    """PP-OCRv4's recogniser: ONNX Runtime's symbolic shape inference gives up on it, so
    ONNX's own is used; its first convolution reads 3 channels and is padded to 4, exactly:
    the two graphs compute the same (run unfused, each QDQ pair as the standard defines it;
    fused into int8 kernels they are equal on VNNI hosts, while AVX2's u8s8 kernels sum
    channels in saturating pairs, so 3 and 4 channels round differently there)."""
    import onnxruntime as ort

    spec = read_onnx_spec(ppocr_rec_path)
    calibration = quantize.load_calibration_set(tiny_lmdb, spec)
    padded, plain = tmp_path / "padded.onnx", tmp_path / "plain.onnx"
    assert quantize.quantize_model(ppocr_rec_path, padded, calibration,
                                   min_agreement=0.0).padded_convs == 1
    quantize.quantize_model(ppocr_rec_path, plain, calibration, min_agreement=0.0,
                            pad_channels=False)
    assert _conv_weight_channels(plain)[0] == 3 and _conv_weight_channels(padded)[0] == 4
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for path in (padded, plain))
    for batch in calibration.batches:
        assert batch.shape[1] == 3
        feed = {spec.input_name: batch}
        assert np.array_equal(a.run(None, feed)[0], b.run(None, feed)[0])
