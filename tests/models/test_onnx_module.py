"""ONNX graphs as trainable PyTorch modules (models.onnx_module), against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from common.errors import ToolchainError
from models.checkpoint import GRAPH_KEY, load_checkpoint, save_checkpoint
from models.onnx_module import GraphBatchNorm, GraphModule, read_graph
from tests.conftest import build_tiny_ctc_graph, tiny_ctc_spec


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("batch", "width"), [(1, 8), (2, 57), (3, 100), (1, 161)])
def test_the_module_computes_what_onnx_runtime_does(batch, width):
    model = build_tiny_ctc_graph()
    module = GraphModule(model).eval()
    x = np.random.default_rng(width).uniform(-1, 1, (batch, 3, 16, width)).astype(np.float32)
    expected = _ort(model).run(None, {"x": x})[0]
    with torch.no_grad():
        found = module(torch.from_numpy(x)).numpy()
    assert found.shape == expected.shape == (batch, width // 8, 66)
    assert np.abs(found - expected).max() < 1e-5


def test_every_stored_weight_trains_and_logits_are_the_softmax_input():
    module = GraphModule(build_tiny_ctc_graph(), logits=True).eval()
    # Conv and BatchNormalization become layers; MatMul weights, biases and layer-norm
    # scales parameters; scalars (eps, 2.0) and shapes stay constants
    assert [type(layer).__name__ for layer in module.layers.values()] == [
        "Conv2d", "GraphBatchNorm", "Conv2d", "Conv2d"]
    assert sorted(module.weights) == sorted(["ln_gamma", "ln_beta", "fc_w", "fc_b", "head_w",
                                             "head_b"])
    x = torch.rand(2, 3, 16, 64)
    logits = module(x)
    module.logits = False
    assert torch.allclose(module(x), logits.softmax(2), atol=1e-6)
    module.logits = True
    module(x).log_softmax(2)[:, :, 1].sum().backward()
    trained = [name for name, p in module.named_parameters() if p.requires_grad]
    assert len(trained) == 2 + 2 + 1 + 2 + 6  # conv1 w+b, bn scale+bias, conv2 w, conv3 w+b
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_logits_are_found_behind_the_softmax_that_the_opset_13_conversion_writes():
    from onnx import version_converter

    # onnx's converter writes an opset 11 Softmax over the last axis as Flatten, Softmax,
    # Reshape (what convert.quantize quantises, and train.qat trains)
    converted = version_converter.convert_version(build_tiny_ctc_graph(), 13)
    assert [n.op_type for n in converted.graph.node][-1] == "Reshape"
    module = GraphModule(converted, logits=True).eval()
    x = torch.rand(2, 3, 16, 48)
    with torch.no_grad():
        logits = module(x)
        module.logits = False
        assert torch.allclose(module(x), logits.softmax(2), atol=1e-6)


def test_weights_written_back_keep_the_graph_and_the_structure_rebuilds_it(tmp_path):
    model = build_tiny_ctc_graph()
    module = GraphModule(model, logits=True)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1.1)
    written = module.to_onnx()
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    assert written.opset_import == model.opset_import
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 72)).astype(np.float32)
    module.logits = False
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(_ort(written).run(None, {"x": x})[0] - expected).max() < 1e-5
    # The structure holds no trained data; with the state dict it rebuilds the module.
    structure = module.structure()
    assert len(structure) < model.ByteSize() / 2
    rebuilt = GraphModule(onnx.load_from_string(structure))
    rebuilt.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(torch.from_numpy(x)), module(torch.from_numpy(x)))
    # ... which is what a checkpoint of it stores and load_checkpoint reads back
    spec = tiny_ctc_spec().replace(output_kind="logits")
    save_checkpoint(tmp_path / "m.pth", module, spec)
    assert isinstance(torch.load(tmp_path / "m.pth", weights_only=True)[GRAPH_KEY], bytes)
    loaded = load_checkpoint(tmp_path / "m.pth", spec)
    assert isinstance(loaded, GraphModule) and loaded.logits
    with torch.no_grad():
        assert torch.allclose(loaded(torch.from_numpy(x)).softmax(2),
                              torch.from_numpy(expected), atol=1e-6)


def test_constant_nodes_hold_trainable_weights_too():
    """PP-OCRv4's graph stores its weights in Constant nodes, not initializers."""
    model = build_tiny_ctc_graph()
    graph = model.graph
    moved = {"head.w", "head.b", "eps"}
    constants = [helper.make_node("Constant", [], [t.name], value=t)
                 for t in graph.initializer if t.name in moved]
    kept = [t for t in graph.initializer if t.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(constants + nodes)
    module = GraphModule(model)
    assert "head_w" in module.weights and "eps" not in module.weights
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 40)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(module(torch.from_numpy(x)).numpy()
                      - _ort(model).run(None, {"x": x})[0]).max() < 1e-5
    with torch.no_grad():
        module.weights["head_w"].zero_()
    written = module.to_onnx()
    value = next(a.t for n in written.graph.node if n.op_type == "Constant"
                 and n.output[0] == "head.w" for a in n.attribute)
    assert not numpy_helper.to_array(value).any()


def test_what_the_conversion_cannot_take_is_named(tmp_path):
    model = build_tiny_ctc_graph()
    model.graph.node.append(helper.make_node("GridSample", ["probs", "probs"], ["odd"],
                                             name="warp"))
    with pytest.raises(ToolchainError, match="not supported.*GridSample node 'warp'"):
        GraphModule(model)
    # a Conv weight computed by the graph cannot become a parameter
    model = build_tiny_ctc_graph()
    first = model.graph.node[0]
    model.graph.node.insert(0, helper.make_node("Identity", ["c1.w"], ["c1.w.copy"]))
    first.input[1] = "c1.w.copy"
    with pytest.raises(ToolchainError, match="conv1.*computed, not stored"):
        GraphModule(model)
    # an average pool that PyTorch would average over added padding is refused, not run
    model = build_tiny_ctc_graph()
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    pool.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    with pytest.raises(ToolchainError, match="AveragePool node .*SAME padding without"):
        GraphModule(model)
    # logits need a final Softmax
    model = build_tiny_ctc_graph()
    model.graph.node[-1].op_type = "Sigmoid"
    del model.graph.node[-1].attribute[:]
    with pytest.raises(ToolchainError, match="not a Softmax"):
        GraphModule(model, logits=True)
    # a file that is not ONNX is named
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ToolchainError, match="bad.onnx"):
        read_graph(bad)


def test_batchnorm_of_any_rank_follows_onnx():
    layer = GraphBatchNorm(4).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 9.0, 16.0]))
    x = torch.ones(2, 4, 5)  # [N, C, L]: what nn.BatchNorm2d refuses
    expected = (1 - layer.running_mean[None, :, None]) / torch.sqrt(
        layer.running_var[None, :, None] + layer.eps)
    assert torch.allclose(layer(x), expected)
    with pytest.raises(ValueError, match="rank >= 2"):
        layer(torch.ones(4))


@pytest.mark.parametrize("fixture", ["ppocr_v6_rec_path", "ppocr_rec_path"])
def test_real_ppocr_recognisers_match_onnx_runtime_on_real_crops(fixture, request):
    """The shipped PP-OCRv6 and PP-OCRv4 recognisers (v4 keeps its weights in Constant
    nodes), converted, on IIIT5K crops at four widths: the check training runs before it
    starts (train.trainer.check_converted)."""
    from models.onnx_file import read_onnx_spec
    from preprocess.lmdb_reader import default_test_set
    from train.trainer import check_converted, load_words

    path = request.getfixturevalue(fixture)
    spec = read_onnx_spec(path)
    words = load_words(default_test_set(), spec, spec.charset, keep=lambda i: i % 60 == 0)
    module = read_graph(path, logits=True)
    checked = check_converted(module, spec, words)
    assert len(checked) == 4 and len({w for w, _ in checked}) == 4
    assert max(d for _, d in checked) < 1e-4
    assert module.logits  # left as it was
    # a converted model that drifted from its file is stopped before training
    with torch.no_grad():
        next(iter(module.weights.values())).add_(0.5)
    with pytest.raises(ToolchainError, match="differs from ONNX Runtime.*width"):
        check_converted(module, spec, words)


def test_a_checkpoint_whose_graph_is_damaged_is_named(tmp_path):
    module = GraphModule(build_tiny_ctc_graph(), logits=True)
    spec = tiny_ctc_spec().replace(output_kind="logits")
    save_checkpoint(tmp_path / "m.pth", module, spec)
    contents = torch.load(tmp_path / "m.pth", weights_only=True)
    contents[GRAPH_KEY] = b"\x08\x07garbage"  # not a serialised ModelProto
    torch.save(contents, tmp_path / "bad.pth")
    with pytest.raises(ToolchainError, match=f"bad.pth: its {GRAPH_KEY} is not a readable"):
        load_checkpoint(tmp_path / "bad.pth", spec)
    contents[GRAPH_KEY] = module.structure()
    del contents["state_dict"]["weights.head_w"]
    torch.save(contents, tmp_path / "short.pth")
    with pytest.raises(ToolchainError, match="short.pth: its weights do not fit its own graph"):
        load_checkpoint(tmp_path / "short.pth", spec)
