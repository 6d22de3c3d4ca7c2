"""Rewrite an exported CRNN ONNX graph so ATC can build a dynamic-shape Ascend model.

Applies the rules of :mod:`convert.rewrite_rules` (zero LSTM initial states dropped, time
flips folded into reverse LSTMs, Reshape/Gemm/Reshape turned into MatMul + Add), folds
constants, removes dead nodes, prints op-type counts before and after, and verifies the
result: ONNX Runtime outputs of the input and output models must agree within the
tolerance at several (batch, width) pairs. Batch and width stay dynamic. Fixing a fixed
model changes nothing. The ModelZoo guide's equivalent is ``python3 fix.py in.onnx out.onnx``.

Example:
    python -m convert.fix nano.onnx nano_fixed.onnx
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import atomic_path
from convert.rewrite_rules import RULES, tidy
from infer.compare import compare_runners
from infer.onnxruntime_runner import OnnxRuntimeRunner
from models.onnx_file import check_model_output, load_onnx

log = logging.getLogger(__name__)

#: Op types ATC's dynamic-shape build should not see in a fixed CRNN.
UNWANTED_OPS = ("Shape", "Gather", "ConstantOfShape", "Gemm")
DEFAULT_TOLERANCE = 1e-5
VERIFY_PAIRS = ((1, 32), (2, 100), (4, 320), (3, 57))
FIX_METADATA_KEY = "crnn_toolchain.fix_rules"


def op_counts(model: onnx.ModelProto) -> Counter:
    """Op type -> number of nodes in the main graph."""
    return Counter(node.op_type for node in model.graph.node)


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply every rule once, then tidy.

    Returns:
        The rewritten model (metadata and opset kept) and ``{rule name: matches}``.
    """
    graph = gs.import_onnx(model)
    applied = {rule.__name__: rule(graph) for rule in RULES}
    fixed = gs.export_onnx(tidy(graph), do_type_check=True)
    fixed.ir_version = model.ir_version
    fixed.producer_name, fixed.doc_string = model.producer_name, model.doc_string
    props = {p.key: p.value for p in model.metadata_props if p.key != FIX_METADATA_KEY}
    previous = json.loads(
        next((p.value for p in model.metadata_props if p.key == FIX_METADATA_KEY), "{}")
    )
    props[FIX_METADATA_KEY] = json.dumps(
        {name: previous.get(name, 0) + n for name, n in applied.items()}
    )
    onnx.helper.set_model_props(fixed, props)
    return fixed, applied


def dynamic_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Input name -> indices of its symbolic (dynamic) dimensions."""
    return {
        value.name: [i for i, d in enumerate(value.type.tensor_type.shape.dim) if d.dim_param]
        for value in model.graph.input
    }


def compare_outputs(original: onnx.ModelProto, fixed: onnx.ModelProto,
                    pairs: Sequence[tuple[int, int]] = VERIFY_PAIRS,
                    tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> float:
    """Run both models on the same random ``[batch, C, H, width]`` inputs (uniform in
    [-1, 1)) with ONNX Runtime, from memory, through ``infer.compare.compare_runners``.

    Returns:
        The largest absolute output difference over all pairs and outputs.

    Raises:
        ToolchainError: a difference above ``tolerance``, or a changed output shape.
    """
    rng = np.random.default_rng(seed)
    with OnnxRuntimeRunner(original) as before, \
            OnnxRuntimeRunner(fixed) as after:
        (feed,) = before.input_specs()
        channels, height = feed.shape[1], feed.shape[2]
        feeds = [{feed.name: rng.uniform(-1, 1, (batch, channels, height, width))
                  .astype(np.float32)} for batch, width in pairs]
        try:
            compared = compare_runners(before, after, feeds)
        except ToolchainError as exc:
            raise ToolchainError(f"the rewritten model changed an output: {exc}") from None
    worst = 0.0
    for found in compared:
        batch, width = pairs[found.feed]
        worst = max(worst, found.max_abs_diff)
        if found.max_abs_diff > tolerance:
            raise ToolchainError(f"rewritten model differs by {found.max_abs_diff:.3g} "
                                 f"(> {tolerance:g}) at batch {batch}, width {width}; not "
                                 "writing it")
    return worst


def check_fixable(model: onnx.ModelProto, source: str | Path) -> None:
    """Raise :class:`ToolchainError` unless ``model`` is a recogniser graph this tool can
    verify: nodes, and one float32 ``[batch, channels, height, width]`` input."""
    graph = model.graph
    if not graph.node or not graph.input:
        raise ToolchainError(f"{source}: holds no graph (an empty file, or not an ONNX model)")
    if len(graph.input) != 1:
        names = ", ".join(i.name for i in graph.input)
        raise ToolchainError(f"{source}: has {len(graph.input)} inputs ({names}); convert.fix "
                             "takes a recogniser with one image input")
    tensor = graph.input[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        raise ToolchainError(f"{source}: input {graph.input[0].name!r} is {kind} of rank "
                             f"{len(tensor.shape.dim)}; convert.fix takes float32 "
                             "[batch, channels, height, width]")


def fix_model(source: str | Path, target: str | Path,
              tolerance: float = DEFAULT_TOLERANCE) -> dict[str, object]:
    """Rewrite ``source`` into ``target`` and verify it.

    Returns:
        ``{"before": Counter, "after": Counter, "applied": {rule: n}, "max_abs_diff": float}``.

    Raises:
        ToolchainError: unreadable input, lost dynamic axes, or outputs that disagree.
    """
    check_model_output(target, source)
    original = load_onnx(source)
    check_fixable(original, source)
    fixed, applied = rewrite(original)
    onnx.checker.check_model(fixed)
    if dynamic_axes(fixed) != dynamic_axes(original):
        raise ToolchainError(f"rewriting {source} changed the dynamic axes: "
                             f"{dynamic_axes(original)} -> {dynamic_axes(fixed)}")
    worst = compare_outputs(original, fixed, tolerance=tolerance)
    with atomic_path(target) as partial:
        onnx.save(fixed, str(partial))
    return {"before": op_counts(original), "after": op_counts(fixed),
            "applied": applied, "max_abs_diff": worst}


def format_counts(before: Counter, after: Counter) -> str:
    """A two-column table of op-type counts, one op type a line."""
    lines = [f"{'op type':<18}{'before':>7}{'after':>7}"]
    for op in sorted(set(before) | set(after)):
        lines.append(f"{op:<18}{before.get(op, 0):>7}{after.get(op, 0):>7}")
    lines.append(f"{'total':<18}{sum(before.values()):>7}{sum(after.values()):>7}")
    return "\n".join(lines)


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("input", type=Path, help="ONNX model from convert.pth2onnx")
    parser.add_argument("output", type=Path, help="rewritten ONNX model to write")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max absolute output difference allowed")
    return parser


def _run(args) -> int:
    result = fix_model(args.input, args.output, args.tolerance)
    print(format_counts(result["before"], result["after"]))
    applied = ", ".join(f"{name} x{n}" for name, n in result["applied"].items())
    print(f"rules: {applied}")
    left = {op: result["after"][op] for op in UNWANTED_OPS if result["after"].get(op)}
    if left:
        log.warning("still present for ATC: %s", left)
    print(f"wrote {args.output}; outputs agree within {result['max_abs_diff']:.2e} "
          f"(<= {args.tolerance:g}) at (batch, width) {list(VERIFY_PAIRS)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
