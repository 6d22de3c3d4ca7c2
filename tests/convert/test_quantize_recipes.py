"""convert.quantize beyond the CRNN default: recipes, the sensitivity search, the part kept
fp32, and detectors calibrated on photos, on real models and real images."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from common.errors import ToolchainError
from convert import quantize
from infer.open import open_model
from models.det_spec import DetectorSpec
from models.onnx_file import read_onnx_spec
from models.spec import QUANTIZATION_METADATA_KEY
from models.weights import fetch
from pipeline.detector import Detector
from preprocess.image_folder import read_image
from tests.eval.test_det_rec import IC15_IMAGES

ic15 = pytest.mark.skipif(not IC15_IMAGES.is_dir(),
                          reason=f"ICDAR 2015 test images not found at {IC15_IMAGES}")


def _recorded(path) -> dict:
    model = onnx.load(str(path))
    return json.loads({p.key: p.value for p in model.metadata_props}[QUANTIZATION_METADATA_KEY])


def _weight_is_int8(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """Whether ``node``'s second input (its weights) comes out of a DequantizeLinear."""
    producers = {name: n for n in graph.node for name in n.output}
    producer = producers.get(node.input[1])
    return producer is not None and producer.op_type == "DequantizeLinear"


def test_search_keeps_the_noisiest_activations_fp32_and_records_them(tmp_path, tiny_lmdb,
                                                                      fixed_models):
    source = fixed_models["nano-ocr"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source))
    recipe = quantize.Recipe(target_agreement=1.01, max_fp32_tensors=2)  # never met: 2 steps
    out = tmp_path / "int8.onnx"
    result = quantize.quantize_model(source, out, calibration, min_agreement=0.0, recipe=recipe)
    assert [step["fp32_tensors"] for step in result.search] == [0, 1, 2]
    assert all(0.0 <= step["agreement"] <= 1.0 for step in result.search)
    first, second = result.search[1]["tensors"], result.search[2]["tensors"]
    assert len(first) == 1 and len(second) == 2 and second[0] == first[0]
    # The model written is the best of the three (the fewest fp32 activations among equals);
    # the activations it keeps fp32 are recorded with their SQNR, noisiest first, and its
    # fp32 nodes really read float weights.
    best = max(result.search, key=lambda step: (step["agreement"], -step["fp32_tensors"]))
    kept = result.fp32_nodes
    assert [entry["tensor"] for entry in kept] == best.get("tensors", [])
    assert [e["sqnr_db"] for e in kept] == sorted(e["sqnr_db"] for e in kept)
    graph = onnx.load(str(out)).graph
    names = {name for entry in kept for name in entry["nodes"]}
    weighted = [n for n in graph.node if n.name in names and n.op_type in ("Conv", "MatMul")]
    assert not any(_weight_is_int8(graph, n) for n in weighted)
    if kept:
        assert weighted
    assert _recorded(out)["fp32_nodes"] == kept


def test_ranking_applies_the_activations_folded_into_quantisation(tmp_path, tiny_lmdb,
                                                                  fixed_models):
    """ONNX Runtime folds a Relu into the QuantizeLinear after it; compared raw, the tensor
    before the pair (the Relu's input) looks like noise at a few dB."""
    source = fixed_models["nano-ocr"]
    spec = read_onnx_spec(source)
    calibration = quantize.load_calibration_set(tiny_lmdb, spec)
    from onnx import version_converter

    onnx.save(version_converter.convert_version(onnx.load(str(source)), quantize.MIN_OPSET),
              str(tmp_path / "fp32.onnx"))
    quantize._pre_process(tmp_path / "fp32.onnx", tmp_path / "pre.onnx", "nano")
    quantize._named(tmp_path / "pre.onnx")
    # The ranking reads names from the graph that was quantised; re-quantise from it.
    quantize._quantize_static(tmp_path / "pre.onnx", tmp_path / "q.onnx", calibration,
                              spec.input_name, quantize.Recipe(), True, True, [],
                              tmp_path / "ranges.json")
    ranked = quantize.rank_activations(tmp_path / "pre.onnx", tmp_path / "q.onnx",
                                       [{spec.input_name: b} for b in calibration.batches[:2]],
                                       tmp_path)
    assert ranked and [s.sqnr_db for s in ranked] == sorted(s.sqnr_db for s in ranked)
    graph = onnx.load(str(tmp_path / "pre.onnx")).graph
    relu_outputs = {n.output[0] for n in graph.node if n.op_type == "Relu"}
    relus = [s for s in ranked if s.tensor in relu_outputs]
    assert relus and all(math.isfinite(s.sqnr_db) and s.sqnr_db > 15 for s in relus)


def test_fp32_from_keeps_the_sequence_model_float(tmp_path, tiny_lmdb, fixed_models):
    source = fixed_models["nano-ocr"]
    calibration = quantize.load_calibration_set(tiny_lmdb, read_onnx_spec(source))
    out = tmp_path / "int8.onnx"
    result = quantize.quantize_model(source, out, calibration, min_agreement=0.0,
                                     recipe=quantize.Recipe(fp32_from="LSTM"))
    graph = onnx.load(str(out)).graph
    assert all(_weight_is_int8(graph, n) for n in graph.node if n.op_type == "Conv")
    assert not any(_weight_is_int8(graph, n) for n in graph.node if n.op_type == "MatMul")
    assert result.fp32_from == "LSTM" and "LSTM" in result.fp32_nodes[0]["why"]
    with pytest.raises(ToolchainError, match="no Attention node"):
        quantize.quantize_model(source, tmp_path / "x.onnx", calibration,
                                recipe=quantize.Recipe(fp32_from="Attention"))
    assert not (tmp_path / "x.onnx").exists()


def test_ppocr_v6_recogniser_takes_its_recipe(tmp_path, tiny_lmdb):
    source = fetch("ppocr-v6-rec")
    spec = read_onnx_spec(source)
    calibration = quantize.load_calibration_set(tiny_lmdb, spec)
    out = tmp_path / "v6_int8.onnx"
    result = quantize.quantize_model(source, out, calibration, min_agreement=0.0)
    recipe = quantize.RECIPES["ppocr-v6-rec"]
    recorded = _recorded(out)
    assert recorded["reduce_range"] is False and recorded["calibration_range"] == "moving-average"
    assert recorded["fp32_from"] == "MatMul" and recorded["recipe"] == recipe.why
    graph = onnx.load(str(out)).graph
    fp32 = set(result.fp32_nodes[0]["nodes"])
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(_weight_is_int8(graph, n) == (n.name not in fp32) for n in convs)
    assert sum(n.name not in fp32 for n in convs) > len(convs) // 2  # the backbone is int8
    assert not any(_weight_is_int8(graph, n) for n in graph.node if n.op_type == "MatMul")
    assert read_onnx_spec(out) == spec and result.agreement_of.startswith("frames")


def test_classifier_is_refused_in_one_line(tmp_path, tiny_lmdb, capsys):
    out = tmp_path / "cls_int8.onnx"
    assert quantize.main([str(fetch("ppocr-cls")), str(out), "--calibration",
                          str(tiny_lmdb)]) == 1
    assert "text-direction classifier" in capsys.readouterr().err
    assert not out.exists()


def test_a_mistyped_name_or_a_missing_output_is_one_line(tmp_path, capsys):
    assert quantize.main(["ppocr-v6-recc"]) == 1
    assert "ppocr-v6-recc: no such file, and not a model with an int8 copy" in \
        capsys.readouterr().err
    assert quantize.main([str(fetch("ppocr-v4-rec"))]) == 1
    assert "give the int8 model to write" in capsys.readouterr().err


def test_cli_writes_nothing_in_the_working_folder(tmp_path, tiny_lmdb, ppocr_rec_path,
                                                  monkeypatch):
    """ONNX Runtime saves a partial model in the working folder where its symbolic shape
    inference gives up (PP-OCRv4's recogniser): the tool runs it elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "v4_int8.onnx"
    assert quantize.main([str(ppocr_rec_path), str(out), "--calibration", str(tiny_lmdb),
                          "--target-agreement", "0", "--min-agreement", "0"]) == 0
    assert out.is_file() and list(work.iterdir()) == []
    assert _recorded(out)["search"] == [{"fp32_tensors": 0,
                                         "agreement": _recorded(out)["search"][0]["agreement"]}]


@ic15
def test_detector_calibrates_on_photos_and_compares_its_binarised_map(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in (2, 4, 6):
        shutil.copy(IC15_IMAGES / f"img_{n}.jpg", photos)
    (photos / "img_8.jpg").write_bytes(b"not a jpeg")
    (photos / "img_9.jpg").mkdir()
    source = fetch("ppocr-v6-det")
    _, spec = open_model(source, expect=DetectorSpec)
    calibration = quantize.load_calibration_set(photos, spec)
    assert calibration.used == 3 and calibration.threshold == spec.thresh
    assert all(b.shape[:2] == (1, 3) and b.dtype == np.float32 for b in calibration.batches)
    assert {f["image"] for f in calibration.failed} == {"img_8.jpg", "img_9.jpg"}
    assert quantize.load_calibration_set(photos, spec, samples=1).used == 1
    out = tmp_path / "det_int8.onnx"
    recipe = replace(quantize.recipe_for(spec), target_agreement=None)
    result = quantize.quantize_model(source, out, calibration, recipe=recipe)
    assert result.agreement_of == f"probability-map pixels on the same side of {spec.thresh:g}"
    assert result.agreement >= quantize.RECIPES["ppocr-v6-det"].min_agreement
    assert result.padded_convs >= 1 and result.reduce_range is False
    # The int8 detector is a detector: same description, and it finds the same text.
    runner, int8_spec = open_model(out, expect=DetectorSpec)
    assert int8_spec == spec
    fp32_runner, _ = open_model(source, expect=DetectorSpec)
    image = read_image(photos / "img_2.jpg", 10**8)
    with Detector(runner, spec) as int8_det, Detector(fp32_runner, spec) as fp32_det:
        int8_boxes, fp32_boxes = int8_det([image])[0], fp32_det([image])[0]
    assert fp32_boxes and abs(len(int8_boxes) - len(fp32_boxes)) <= max(1, len(fp32_boxes) // 10)
