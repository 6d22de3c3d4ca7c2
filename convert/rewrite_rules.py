"""Graph rewrite rules that make an exported CRNN acceptable to Huawei's ATC compiler.

Each rule takes an onnx-graphsurgeon graph, rewrites every match in place, and returns the
number of matches; dead nodes are left for :func:`tidy` to remove. Every rule is exact
(the rewritten graph computes the same function), and a second application matches
nothing, which makes ``convert.fix`` idempotent.

Why ATC needs them: with dynamic batch and width, ATC must infer every shape from the input
range. The TorchScript exporter computes reshape targets and LSTM initial states at run
time (``Shape -> Gather -> Unsqueeze -> Concat``), which ATC's shape inference handles
poorly on dynamic inputs and which ModelZoo's fix.py removes; 2-D ``Gemm`` behind a flatten
forces those reshapes in the first place; and the ModelZoo checkpoint's backward LSTM on a
``Slice`` with step -1 is a pair of reversing copies that an LSTM with
``direction="reverse"`` does for free.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

Rule = Callable[[gs.Graph], int]


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type ``op`` that produces ``tensor``, if that is what produces it."""
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _shape_index(tensor: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """``(x, i)`` when ``tensor`` is ``Gather(Shape(x), i)``, ``i`` a constant scalar; else None."""
    gather = producer(tensor, "Gather")
    shape = producer(gather.inputs[0], "Shape") if gather else None
    if shape is None:
        return None
    index = const_value(gather.inputs[1])
    if index is None or index.size != 1:
        return None
    return shape.inputs[0], int(index.reshape(-1)[0])


def _dim_of(tensor: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """``(x, i)`` when ``tensor`` is ``Unsqueeze(Gather(Shape(x), i))`` (one dim); else None."""
    unsqueeze = producer(tensor, "Unsqueeze")
    return _shape_index(unsqueeze.inputs[0]) if unsqueeze else None


def _is_restore_leading_dims(shape: gs.Tensor, source: gs.Tensor) -> bool:
    """True when ``shape`` is ``Concat(dim(source, 0), dim(source, 1), [-1])``."""
    concat = producer(shape, "Concat")
    if concat is None or len(concat.inputs) != 3:
        return False
    last = const_value(concat.inputs[2])
    return (
        _dim_of(concat.inputs[0]) == (source, 0)
        and _dim_of(concat.inputs[1]) == (source, 1)
        and last is not None and last.reshape(-1).tolist() == [-1]
    )


def _is_flatten_keeping_last(shape: gs.Tensor, source: gs.Tensor, last_dim: int) -> bool:
    """True when ``shape`` reshapes rank-3 ``source`` to ``[d0 * d1, last_dim]`` row by row.

    Accepts a constant ``[-1, last_dim]`` or the exporter's
    ``Concat(Unsqueeze(Mul(dim0, dim1)), dim(source, 2))``. Not ``[0, last_dim]``: ONNX's
    0 copies ``d0``, which is a flatten only when ``d1 == 1``.
    """
    value = const_value(shape)
    if value is not None:
        return value.reshape(-1).tolist() == [-1, last_dim]
    concat = producer(shape, "Concat")
    if concat is None or len(concat.inputs) != 2 or _dim_of(concat.inputs[1]) != (source, 2):
        return False
    unsqueeze = producer(concat.inputs[0], "Unsqueeze")
    mul = producer(unsqueeze.inputs[0], "Mul") if unsqueeze else None
    if mul is None:
        return False
    factors = [_shape_index(factor) for factor in mul.inputs]
    return (all(f is not None and f[0] is source for f in factors)
            and {f[1] for f in factors} == {0, 1})


def gemm_to_matmul(graph: gs.Graph) -> int:
    """Reshape -> Gemm -> Reshape around a Linear becomes MatMul + Add on the 3-D tensor.

    Matches: ``x [T, N, H] -> Reshape [T*N, H] -> Gemm(W, b) -> Reshape [T, N, -1]`` where the
    reshape targets are the exporter's Shape/Gather/Unsqueeze/Concat arithmetic on ``x``.
    Produces: ``MatMul(x, W') -> Add(b)`` with ``W'`` = ``alpha * W`` (transposed per
    ``transB``) and bias ``beta * b``; the shape arithmetic becomes dead.
    Why: ATC cannot fold run-time reshape targets over a dynamic range, and MatMul
    broadcasts over ``[T, N]`` so no reshape is needed at all.
    """
    count = 0
    for gemm in [n for n in graph.nodes if n.op == "Gemm"]:
        flatten = producer(gemm.inputs[0], "Reshape")
        if flatten is None or len(gemm.outputs[0].outputs) != 1:
            continue
        restore = gemm.outputs[0].outputs[0]
        weight = const_value(gemm.inputs[1])
        bias = const_value(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
        if restore.op != "Reshape" or weight is None or gemm.attrs.get("transA", 0):
            continue
        source = flatten.inputs[0]
        if gemm.attrs.get("transB", 0):
            weight = weight.T
        if not (_is_flatten_keeping_last(flatten.inputs[1], source, weight.shape[0])
                and _is_restore_leading_dims(restore.inputs[1], source)):
            continue
        name = gemm.name or f"gemm{count}"
        weight = (float(gemm.attrs.get("alpha", 1.0)) * weight).astype(np.float32)
        product = gs.Variable(f"{name}/matmul_out", dtype=np.float32)
        graph.nodes.append(gs.Node("MatMul", f"{name}/MatMul",
                                   inputs=[source, gs.Constant(f"{name}/weight_t", weight)],
                                   outputs=[product]))
        result = restore.outputs[0]
        restore.outputs.clear()
        if bias is None:
            bias = np.zeros(weight.shape[1], np.float32)
        bias = (float(gemm.attrs.get("beta", 1.0)) * bias).astype(np.float32)
        graph.nodes.append(gs.Node("Add", f"{name}/Add",
                                   inputs=[product, gs.Constant(f"{name}/bias", bias)],
                                   outputs=[result]))
        gemm.outputs.clear()
        count += 1
    return count


def drop_zero_initial_states(graph: gs.Graph) -> int:
    """Remove LSTM initial states that are zeros built at run time.

    Matches: LSTM inputs ``initial_h`` (5) and ``initial_c`` (6) produced by a
    ``ConstantOfShape`` whose value is 0 (or absent, which means 0), fed by the exporter's
    ``Shape -> Gather -> Unsqueeze -> Concat`` batch-size arithmetic.
    Produces: the same LSTM with those optional inputs omitted (ONNX defines omitted
    initial states as zeros), trailing empty inputs trimmed.
    Why: the run-time shape chain is what ATC's dynamic shape inference trips on.
    """
    count = 0
    for lstm in [n for n in graph.nodes if n.op in ("LSTM", "GRU", "RNN")]:
        changed = False
        for index in range(5, len(lstm.inputs)):
            fill = producer(lstm.inputs[index], "ConstantOfShape")
            if fill is None:
                continue
            value = fill.attrs.get("value")
            if value is not None and np.any(np.asarray(value.values) != 0):
                continue
            lstm.inputs[index] = gs.Variable.empty()
            changed = True
        while lstm.inputs and lstm.inputs[-1].name == "":
            lstm.inputs.pop()
        count += changed
    return count


def _is_time_flip(node: gs.Node | None) -> bool:
    """True for ``Slice(x, starts=[-1], ends=[<= -2**31], axes=[0], steps=[-1])``."""
    if node is None or node.op != "Slice" or len(node.inputs) != 5:
        return False
    starts, ends, axes, steps = (const_value(t) for t in node.inputs[1:])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
        return False
    return (int(starts.item()), int(axes.item()), int(steps.item())) == (-1, 0, -1) \
        and int(ends.item()) <= -(2**31)


def flip_lstm_to_reverse(graph: gs.Graph) -> int:
    """A forward LSTM on a time-flipped sequence, flipped back, becomes a reverse LSTM.

    Matches: ``Slice(step -1 on time) -> LSTM(direction=forward) -> Squeeze(axes=[1]) ->
    Slice(step -1 on time)`` (the ModelZoo layout's ``torch.flip`` before and after its
    ``bw_rnn``), with the LSTM's ``Y_h``/``Y_c`` unused.
    Produces: ``LSTM(direction="reverse") -> Squeeze`` on the unflipped input; both
    Slices become dead. Exact: a reverse LSTM at step t has read ``x[T-1..t]``, as does
    the flipped forward LSTM's output at ``T-1-t``.
    Why: each flip is a full copy of the sequence, and ATC handles negative-step Slice
    over a dynamic axis poorly; ``direction="reverse"`` is native.
    """
    count = 0
    for lstm in [n for n in graph.nodes if n.op == "LSTM"]:
        flip_in = producer(lstm.inputs[0], "Slice")
        if lstm.attrs.get("direction", "forward") != "forward" or not _is_time_flip(flip_in):
            continue
        if any(out.outputs for out in lstm.outputs[1:]) or len(lstm.outputs[0].outputs) != 1:
            continue
        squeeze = lstm.outputs[0].outputs[0]
        if squeeze.op != "Squeeze" or len(squeeze.outputs[0].outputs) != 1:
            continue
        axes = squeeze.attrs.get("axes")
        if axes is None and len(squeeze.inputs) > 1:
            axes = const_value(squeeze.inputs[1])
        if axes is None or list(np.asarray(axes).reshape(-1)) != [1]:
            continue
        flip_out = squeeze.outputs[0].outputs[0]
        if not _is_time_flip(flip_out):
            continue
        lstm.inputs[0] = flip_in.inputs[0]
        lstm.attrs["direction"] = "reverse"
        result = flip_out.outputs[0]
        flip_out.outputs.clear()
        squeeze.outputs[0] = result
        count += 1
    return count


#: Rules in the order ``convert.fix`` applies them.
RULES: list[Rule] = [drop_zero_initial_states, flip_lstm_to_reverse, gemm_to_matmul]


def tidy(graph: gs.Graph) -> gs.Graph:
    """Fold constants, remove dead nodes and sort topologically (dynamic dims untouched)."""
    graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    return graph
