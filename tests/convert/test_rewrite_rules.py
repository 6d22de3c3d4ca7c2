"""Each rewrite rule on a tiny exported graph: it matches what it should, is exact, and
leaves look-alikes alone."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from convert import rewrite_rules
from convert.fix import op_counts


class FlattenLinear(torch.nn.Module):
    """The meijieru embedding: view(T*b, h) -> Linear -> view(T, b, -1)."""

    def __init__(self, restore_leading: bool = True):
        super().__init__()
        self.fc = torch.nn.Linear(8, 5)
        self.restore_leading = restore_leading

    def forward(self, x):
        steps, batch, hidden = x.size()
        out = self.fc(x.view(steps * batch, hidden))
        return out.view(steps, batch, -1) if self.restore_leading else out.view(batch, steps, -1)


class ZeroStateLSTM(torch.nn.Module):
    def __init__(self, explicit_state: float | None = None):
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 4, bidirectional=True)
        self.explicit_state = explicit_state

    def forward(self, x):
        if self.explicit_state is None:
            return self.rnn(x)[0]
        state = torch.full((2, x.size(1), 4), self.explicit_state)
        return self.rnn(x, (state, state))[0]


class FlippedLSTM(torch.nn.Module):
    """The ModelZoo bw_rnn: flip time, forward LSTM, flip back."""

    def __init__(self, dim: int = 0):
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 4)
        self.dim = dim

    def forward(self, x):
        return torch.flip(self.rnn(torch.flip(x, [self.dim]))[0], [self.dim])


def _export(module, path):
    x = torch.randn(5, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "T", 1: "N"}, "y": {0: "T", 1: "N"}},
                          opset_version=11, dynamo=False)
    return onnx.load(str(path))


def _apply(model, rule, *before):
    """Apply ``before`` rules, then ``rule``; return ``rule``'s matches and the tidied model."""
    graph = gs.import_onnx(model)
    for other in before:
        other(graph)
    matches = rule(graph)
    return matches, gs.export_onnx(rewrite_rules.tidy(graph))


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _assert_same_function(a, b):
    for steps, batch in ((5, 3), (1, 1), (9, 2)):
        x = np.random.default_rng(steps).standard_normal((steps, batch, 8)).astype(np.float32)
        np.testing.assert_allclose(_run(a, x), _run(b, x), atol=1e-6)


def test_gemm_to_matmul(tmp_path):
    model = _export(FlattenLinear(), tmp_path / "m.onnx")
    assert op_counts(model)["Gemm"] == 1
    matches, fixed = _apply(model, rewrite_rules.gemm_to_matmul)
    counts = op_counts(fixed)
    assert matches == 1
    assert counts["Gemm"] == counts["Reshape"] == counts["Shape"] == counts["Gather"] == 0
    assert counts["MatMul"] == counts["Add"] == 1
    _assert_same_function(model, fixed)
    assert _apply(fixed, rewrite_rules.gemm_to_matmul)[0] == 0


def test_gemm_with_other_restore_shape_is_left_alone(tmp_path):
    model = _export(FlattenLinear(restore_leading=False), tmp_path / "m.onnx")
    matches, fixed = _apply(model, rewrite_rules.gemm_to_matmul)
    assert matches == 0 and op_counts(fixed)["Gemm"] == 1


def test_drop_zero_initial_states(tmp_path):
    model = _export(ZeroStateLSTM(), tmp_path / "m.onnx")
    assert op_counts(model)["ConstantOfShape"] == 1
    matches, fixed = _apply(model, rewrite_rules.drop_zero_initial_states)
    assert matches == 1
    counts = op_counts(fixed)
    assert counts["ConstantOfShape"] == counts["Shape"] == counts["Gather"] == 0
    (lstm,) = [n for n in fixed.graph.node if n.op_type == "LSTM"]
    assert len(lstm.input) <= 4  # X, W, R, B: the optional states are gone
    _assert_same_function(model, fixed)


def test_nonzero_initial_states_are_kept(tmp_path):
    model = _export(ZeroStateLSTM(explicit_state=0.5), tmp_path / "m.onnx")
    matches, fixed = _apply(model, rewrite_rules.drop_zero_initial_states)
    assert matches == 0
    _assert_same_function(model, fixed)


def test_flip_lstm_to_reverse(tmp_path):
    model = _export(FlippedLSTM(), tmp_path / "m.onnx")
    assert op_counts(model)["Slice"] == 2
    # The zero-state rule first, as convert.fix does: until then the flipped input also
    # feeds the run-time batch-size arithmetic, which keeps the first Slice alive.
    matches, fixed = _apply(model, rewrite_rules.flip_lstm_to_reverse,
                            rewrite_rules.drop_zero_initial_states)
    assert matches == 1
    assert op_counts(fixed)["Slice"] == 0
    (lstm,) = [n for n in fixed.graph.node if n.op_type == "LSTM"]
    assert onnx.helper.get_attribute_value(
        next(a for a in lstm.attribute if a.name == "direction")) == b"reverse"
    _assert_same_function(model, fixed)


def test_flip_on_batch_axis_is_not_a_time_flip(tmp_path):
    model = _export(FlippedLSTM(dim=1), tmp_path / "m.onnx")
    matches, fixed = _apply(model, rewrite_rules.flip_lstm_to_reverse)
    assert matches == 0
    _assert_same_function(model, fixed)


@pytest.mark.parametrize(("target", "is_flatten"),
                         [([-1, 8], True), ([0, 8], False), ([-1, 5], False)])
def test_constant_flatten_targets(target, is_flatten):
    """``[0, H]`` keeps d0 (ONNX Reshape's 0 copies a dim), so it is not a row-wise flatten."""
    shape = gs.Constant("shape", np.array(target, dtype=np.int64))
    assert rewrite_rules._is_flatten_keeping_last(shape, gs.Variable("x"), 8) is is_flatten


@pytest.mark.parametrize("values", [np.array([3]), np.array([[1, 2]])])
def test_const_value_reads_initializers(values):
    assert np.array_equal(rewrite_rules.const_value(gs.Constant("c", values)), values)
    assert rewrite_rules.const_value(gs.Variable("v")) is None
