"""Export a CTC recogniser checkpoint (.pth) to dynamic-shape ONNX and check it against PyTorch.

The graph is image in, logits out, with the tensor names, shapes and frames rule of the
architecture's description (``models.registry``): for crnn and nano-ocr, input ``imgs``
float32 ``[batch, 1, 32, width]`` (batch and width dynamic) and output ``output1`` float32
``[T, batch, classes]`` of raw logits (pre-softmax), ``T = width // 4 + 1``, the names the
Ascend ModelZoo tooling expects. The model description (architecture, alphabet, blank,
tensor names, normalisation, height, width policy, output layout, frames rule) goes into the
ONNX ``metadata_props`` so later steps need no repeated flags.
After export: ``onnx.checker``, then ONNX Runtime against PyTorch on the same random inputs
at several (batch, width) pairs; the export fails when the max absolute difference is
above the tolerance.

A checkpoint of a model converted from ONNX (``python -m train --init ppocr-v6-rec`` or
``--init MODEL.onnx``) is written back into its own graph instead (:func:`export_graph`):
the shipped model's nodes, opset and dynamic batch and width, with the trained weights and
its output (probabilities for PP-OCR), so the fix, atc, quantize and evaluation steps treat it
as the shipped model; the same parity check follows.

Example:
    python -m convert.pth2onnx .cache/weights/nano_ocr_ftr.pth nano.onnx --arch nano-ocr
    python -m convert.pth2onnx work/ft_v6/model.pth ft_v6.onnx
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import atomic_path
from infer.compare import compare_runners
from infer.onnxruntime_runner import OnnxRuntimeRunner
from infer.torch_runner import TorchRunner
from models.checkpoint import load_checkpoint, read_description
from models.onnx_file import check_model_output
from models.onnx_module import GraphModule
from models.registry import ARCHS, GATE_ORDERS, spec_for_arch
from models.spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 11
#: Opsets the TorchScript exporter writes an LSTM CRNN at (torch.onnx's documented range).
MIN_OPSET, MAX_OPSET = 9, 20
DEFAULT_TOLERANCE = 1e-4


def export_onnx(
    model: nn.Module, spec: ModelSpec, output: str | Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Export ``model`` with dynamic batch and width and embed ``spec`` in the metadata.

    Uses the TorchScript exporter (``dynamo=False``): its opset-11 LSTM export is what ATC
    and ``convert.fix`` expect.

    Returns:
        The path written.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(*spec.input_shape(1, spec.width))
    output_axes = {0: "frames", 1: "batch"} if spec.time_major else {0: "batch", 1: "frames"}
    with warnings.catch_warnings():
        # The exporter warns that batch-dependent LSTM states cannot be traced exactly;
        # the parity check below is what tells whether the export is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(output),
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch", 3: "width"}, spec.output_name: output_axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(output))
    onnx.helper.set_model_props(proto, spec.to_metadata())
    frames = f"W//{spec.downsample}+{spec.frame_offset}"
    proto.doc_string = (
        f"{spec.arch}: {spec.input_name} [N,{spec.channels},{spec.height},W] -> "
        f"{spec.output_kind} {spec.output_layout} ({frames} frames)"
    )
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(output))
    return output


def export_graph(model: GraphModule, spec: ModelSpec, output: str | Path) -> ModelSpec:
    """Write a model converted from ONNX (a checkpoint ``python -m train --init MODEL.onnx``
    wrote) back as ONNX: its original graph, nodes, opset and dynamic axes unchanged, with the
    trained weights in its tensors (``GraphModule.to_onnx``) and ``spec`` in the metadata
    (other metadata keys, such as PaddleOCR's ``character``, are kept).

    Returns:
        The written file's description: ``spec`` with the graph's own output kind
        (``probabilities`` where training took the logits before its final Softmax).
    """
    written = spec.replace(output_kind="probabilities") if model.logits else spec
    proto = model.to_onnx()
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(written.to_metadata())
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(output))
    return written


def parity_pairs(spec: ModelSpec) -> list[tuple[int, int]]:
    """(batch, width) pairs checked after export: narrow, the training width, wide and odd."""
    narrow = max(32, spec.min_input_width)
    return [(1, narrow), (2, spec.width), (3, max(320, spec.max_width)), (1, narrow + 25)]


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    spec: ModelSpec,
    pairs: Sequence[tuple[int, int]],
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> list[tuple[int, int, float]]:
    """Compare ONNX Runtime with PyTorch on the same random inputs (uniform in [-1, 1)), one
    feed per ``(batch, width)`` pair, through ``infer.compare.compare_runners``.

    Returns:
        ``(batch, width, max_abs_diff)`` for each pair.

    Raises:
        ToolchainError: a difference is above ``tolerance`` or an output shape differs.
    """
    generator = torch.Generator().manual_seed(seed)
    feeds = [{spec.input_name: (torch.rand(*spec.input_shape(batch, width), generator=generator)
                                * 2 - 1).numpy()} for batch, width in pairs]
    # The runners' own errors name the file already; the comparison's are named here.
    with TorchRunner.from_module(model, spec) as reference, \
            OnnxRuntimeRunner(onnx_path) as candidate:
        try:
            compared = compare_runners(reference, candidate, feeds, [spec.output_name])
        except ToolchainError as exc:
            raise ToolchainError(f"{onnx_path}: {exc}") from None
    results = []
    for (batch, width), found in zip(pairs, compared):
        results.append((batch, width, found.max_abs_diff))
        if found.max_abs_diff > tolerance:
            raise ToolchainError(
                f"{onnx_path}: ONNX Runtime differs from PyTorch by {found.max_abs_diff:.3g} "
                f"(> {tolerance:g}) at batch {batch}, width {width}"
            )
    return results


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("checkpoint", type=Path, help="the .pth file")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument(
        "--arch",
        help=f"architecture: {', '.join(n for n, e in ARCHS.items() if e.build)} (default: "
             "the description the checkpoint carries, as `python -m train` writes it)",
    )
    layouts = sorted({layout for entry in ARCHS.values() for layout in entry.rnn_layouts})
    parser.add_argument(
        "--rnn-layout",
        default="auto",
        choices=("auto", *layouts),
        help="recurrent layout of the checkpoint (auto: detected from the keys)",
    )
    parser.add_argument(
        "--gate-order",
        default="ifgo",
        choices=GATE_ORDERS,
        help="stored LSTM gate order; igfo for ModelZoo NPU-trained checkpoints",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="max absolute logit difference allowed against PyTorch",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled Python objects in the checkpoint (trusted files only)",
    )
    return parser


def _run(args) -> int:
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise ToolchainError(f"--opset {args.opset} is outside what the exporter writes "
                             f"({MIN_OPSET} to {MAX_OPSET}; ATC takes 11)")
    if args.checkpoint.suffix == ".onnx":
        raise ToolchainError(f"{args.checkpoint}: is an ONNX model already; pth2onnx exports a "
                             "PyTorch checkpoint (.pth)")
    check_model_output(args.output, args.checkpoint)
    if args.arch:
        spec = spec_for_arch(args.arch)
    else:
        spec = read_description(args.checkpoint)
        if spec is None:
            raise ToolchainError(f"{args.checkpoint}: the checkpoint carries no model "
                                 "description; give its architecture with --arch")
    model = load_checkpoint(
        args.checkpoint,
        spec,
        rnn_layout=args.rnn_layout,
        gate_order=args.gate_order,
        trust=args.trust_checkpoint,
    )  # a registry model without a PyTorch definition is refused there, with the fetch hint
    graph = isinstance(model, GraphModule)  # converted from ONNX: written back into its graph
    if graph and args.opset != DEFAULT_OPSET:
        raise ToolchainError(f"{args.checkpoint} was converted from ONNX and is written back "
                             "into its own graph at the graph's opset; leave out --opset")
    with atomic_path(args.output) as partial:  # nothing is left at the output if a check fails
        if graph:
            spec = export_graph(model, spec, partial)
            model.logits = False  # the check compares the graph's own output
        else:
            export_onnx(model, spec, partial, opset=args.opset)
        try:
            results = check_parity(model, partial, spec, parity_pairs(spec),
                                   tolerance=args.tolerance)
        except ToolchainError as exc:
            raise ToolchainError(str(exc).replace(str(partial), str(args.output), 1)
                                 + "; nothing written") from None
    path = args.output
    for batch, width, diff in results:
        print(f"parity batch={batch} width={width}: max |onnxruntime - torch| = {diff:.2e}")
    worst = max(d for _, _, d in results)
    opset = model.opset if graph else args.opset
    print(
        f"exported {args.checkpoint} -> {path} (arch {spec.arch}, opset {opset}, "
        f"{spec.num_classes} classes, {spec.output_kind}"
        + (", the original graph with the trained weights" if graph else "")
        + f"); worst difference {worst:.2e} <= {args.tolerance:g}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
