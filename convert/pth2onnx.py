"""Export a CRNN checkpoint (.pth) to a dynamic-shape ONNX model and check it against PyTorch.

The graph is image in, logits out: input ``imgs`` float32 ``[batch, 1, 32, width]`` (batch and
width dynamic), output ``output1`` float32 ``[T, batch, classes]`` of raw logits
(pre-softmax), ``T = width // 4 + 1``; the names are those the Ascend ModelZoo tooling
expects. The model description (architecture, alphabet, blank, normalisation, height,
width policy) goes into the ONNX ``metadata_props`` so later steps need no repeated flags.
After export: ``onnx.checker``, then ONNX Runtime against PyTorch on the same random inputs
at several (batch, width) pairs; the export fails when the max absolute difference is
above the tolerance.

Example:
    python -m convert.pth2onnx .cache/weights/nano_ocr_ftr.pth nano.onnx --arch nano-ocr
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from convert.checkpoint import GATE_ORDERS, load_checkpoint
from convert.cli import make_parser, run_main
from convert.errors import ToolchainError
from convert.models import CRNN_LAYOUTS
from convert.onnx_io import cpu_session
from convert.spec import ARCHS, ModelSpec, spec_for_arch

log = logging.getLogger(__name__)

INPUT_NAME = "imgs"
OUTPUT_NAME = "output1"
DEFAULT_OPSET = 11
DEFAULT_TOLERANCE = 1e-4


def export_onnx(model: nn.Module, spec: ModelSpec, output: str | Path,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` with dynamic batch and width and embed ``spec`` in the metadata.

    Uses the TorchScript exporter (``dynamo=False``): its opset-11 LSTM export is what ATC
    and ``convert.fix`` expect.

    Returns:
        The path written.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, spec.channels, spec.height, spec.width)
    with warnings.catch_warnings():
        # The exporter warns that batch-dependent LSTM states cannot be traced exactly;
        # the parity check below is what tells whether the export is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(output),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 3: "width"},
                          OUTPUT_NAME: {0: "frames", 1: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load(str(output))
    onnx.helper.set_model_props(proto, spec.to_metadata())
    proto.doc_string = f"CRNN {spec.arch}: imgs [N,1,{spec.height},W] -> logits [W//4+1,N,C]"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(output))
    return output


def parity_pairs(spec: ModelSpec) -> list[tuple[int, int]]:
    """(batch, width) pairs checked after export: 32 px, the training width, and 320 px."""
    return [(1, 32), (2, spec.width), (3, 320), (1, 57)]


def check_parity(model: nn.Module, onnx_path: str | Path, spec: ModelSpec,
                 pairs: Sequence[tuple[int, int]], tolerance: float = DEFAULT_TOLERANCE,
                 seed: int = 0) -> list[tuple[int, int, float]]:
    """Compare ONNX Runtime with PyTorch on the same random inputs.

    Returns:
        ``(batch, width, max_abs_diff)`` for each pair.

    Raises:
        ToolchainError: a difference is above ``tolerance`` or an output shape differs.
    """
    session = cpu_session(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch, width in pairs:
        imgs = torch.rand(batch, spec.channels, spec.height, width, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(imgs).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: imgs.numpy()})
        if actual.shape != expected.shape:
            raise ToolchainError(
                f"{onnx_path}: output shape {actual.shape} != PyTorch {expected.shape} "
                f"at batch {batch}, width {width}"
            )
        diff = float(np.max(np.abs(actual - expected)))
        results.append((batch, width, diff))
        if diff > tolerance:
            raise ToolchainError(
                f"{onnx_path}: ONNX Runtime differs from PyTorch by {diff:.3g} (> {tolerance:g}) "
                f"at batch {batch}, width {width}"
            )
    return results


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("checkpoint", type=Path, help="the .pth file")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--arch", required=True, help=f"architecture: {', '.join(ARCHS)}")
    parser.add_argument("--layout", default="auto", choices=("auto", *CRNN_LAYOUTS),
                        help="crnn recurrent layout (auto: detected from the keys)")
    parser.add_argument("--gate-order", default="ifgo", choices=GATE_ORDERS,
                        help="stored LSTM gate order; igfo for ModelZoo NPU-trained checkpoints")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max absolute logit difference allowed against PyTorch")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow pickled Python objects in the checkpoint (trusted files only)")
    return parser


def _run(args) -> int:
    spec = spec_for_arch(args.arch)
    model = load_checkpoint(args.checkpoint, spec, layout=args.layout,
                            gate_order=args.gate_order, trust=args.trust_checkpoint)
    path = export_onnx(model, spec, args.output, opset=args.opset)
    results = check_parity(model, path, spec, parity_pairs(spec), tolerance=args.tolerance)
    for batch, width, diff in results:
        print(f"parity batch={batch} width={width}: max |onnxruntime - torch| = {diff:.2e}")
    worst = max(d for _, _, d in results)
    print(f"exported {args.checkpoint} -> {path} (arch {spec.arch}, opset {args.opset}, "
          f"{spec.num_classes} classes, logits); worst difference {worst:.2e} <= {args.tolerance:g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
