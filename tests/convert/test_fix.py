"""convert.fix on real exports of both architectures: op counts, agreement, idempotence."""

from __future__ import annotations

import json

import onnx
import pytest

from common.errors import ToolchainError
from convert import fix
from models.onnx_file import read_onnx_spec

VARIANTS = ["nano-ocr", "crnn-meijieru", "crnn-modelzoo"]


@pytest.mark.parametrize("name", VARIANTS)
def test_no_unwanted_ops_remain_and_outputs_agree(exported, fixed_models, name):
    after = fix.op_counts(onnx.load(str(fixed_models[name])))
    assert not {op: after[op] for op in fix.UNWANTED_OPS if after[op]}
    assert after["Slice"] == 0
    original, rewritten = onnx.load(str(exported[name])), onnx.load(str(fixed_models[name]))
    assert fix.compare_outputs(original, rewritten, pairs=[(5, 200), (1, 4)]) <= 1e-5
    assert fix.dynamic_axes(rewritten) == {"imgs": [0, 3]}
    assert read_onnx_spec(fixed_models[name]) == read_onnx_spec(exported[name])


def test_modelzoo_backward_lstms_become_reverse(fixed_models):
    graph = onnx.load(str(fixed_models["crnn-modelzoo"])).graph
    directions = sorted(
        onnx.helper.get_attribute_value(a).decode()
        for n in graph.node if n.op_type == "LSTM"
        for a in n.attribute if a.name == "direction"
    )
    assert directions == ["reverse", "reverse"]  # the forward ones keep the default


@pytest.mark.parametrize("name", VARIANTS)
def test_fix_is_idempotent(tmp_path, fixed_models, name):
    again = tmp_path / "again.onnx"
    result = fix.fix_model(fixed_models[name], again)
    assert set(result["applied"].values()) == {0}
    first, second = onnx.load(str(fixed_models[name])), onnx.load(str(again))
    assert first.graph.SerializeToString() == second.graph.SerializeToString()


def test_cli_prints_counts_for_real_nano_export(tmp_path, exported, capsys):
    out = tmp_path / "nano_fixed.onnx"
    assert fix.main([str(exported["nano-ocr"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ConstantOfShape" in printed and "before" in printed and "after" in printed
    assert "drop_zero_initial_states x1" in printed
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[fix.FIX_METADATA_KEY])["drop_zero_initial_states"] == 1


def test_disagreement_is_refused(tmp_path, exported, monkeypatch):
    """A rule that changes what the graph computes (here: scales a Conv weight by 1.5) is caught."""
    import numpy as np
    import onnx_graphsurgeon as gs

    def corrupt(graph: gs.Graph) -> int:
        conv = next(node for node in graph.nodes if node.op == "Conv")
        conv.inputs[1].values = conv.inputs[1].values * np.float32(1.5)
        return 1

    monkeypatch.setattr(fix, "RULES", [*fix.RULES, corrupt])
    with pytest.raises(ToolchainError, match="differs by"):
        fix.fix_model(exported["nano-ocr"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("content", [None, b"junk"])
def test_bad_input_is_one_line(tmp_path, capsys, content):
    source = tmp_path / "in.onnx"
    if content is not None:
        source.write_bytes(content)
    assert fix.main([str(source), str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}") and err.count("\n") == 1
