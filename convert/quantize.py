"""Static int8 quantisation of a CRNN ONNX model for ONNX Runtime on CPU.

The CPU counterpart of ATC's model build: the Ascend path compiles the fp32 rewritten model
with ``atc``; the ONNX Runtime CPU path runs an int8 copy of the same model, about 2.5x
faster on this project's 2-core x86 benchmark machine at a small accuracy cost (see the
docs/results/README.md). Quantisation is ONNX Runtime's own (``onnxruntime.quantization``):

- format QDQ (QuantizeLinear/DequantizeLinear pairs around Conv and MatMul; ONNX Runtime
  fuses them into integer kernels); the LSTM stays fp32 (QDQ has no int8 LSTM) unless
  ``--lstm int8`` adds ONNX Runtime's dynamic LSTM quantisation (see :func:`quantize_model`);
- activations uint8, asymmetric, per tensor; weights int8, symmetric, per output channel
  (``--per-tensor`` for one scale per weight);
- scales from the min/max of every tensor over calibration images (``MinMax``: the
  histogram calibrators need equal shapes, and keep-ratio batches differ in width);
- convolutions with 1 or 3 input channels (the first one) get zero channels up to 4, an
  exact rewrite that lets ONNX Runtime run them with its symmetric int8 kernels
  (:func:`pad_conv_input_channels`; ``--no-pad-channels`` leaves them);
- ``--reduce-range`` (default on) keeps weights to 7 bits, which avoids the saturation of
  uint8 x int8 products on x86 CPUs without VNNI (ONNX Runtime quantisation guide,
  "when and why do I need to try U8U8 / reduce_range").

Calibration images are read from an IIIT5K-style lmdb and prepared exactly as
``preprocess.parse_testdata`` prepares test inputs (the model description in the ONNX
metadata: grey, height 32, width policy, normalisation), in equal-width batches. Use data
that is not the test set: the default is ``$IIIT5K_CALIB_LMDB``, else
``../shared/data/IIIT5K_train_500``. Models below opset 13 are converted to opset 13 first
(``onnx.version_converter``): per-channel DequantizeLinear needs the ``axis`` attribute.

After quantising, the int8 and fp32 models are run on the calibration images and their
frame-wise arg-max classes compared (the path greedy CTC decoding reads); the tool fails if
the agreement is below ``--min-agreement``. The int8 model keeps the ``crnn.*`` metadata and
records its settings under ``crnn_toolchain.quantization``. It is for ONNX Runtime's CPU
provider; give ``atc`` and the CUDA device the fp32 model.

Example:
    python -m convert.quantize nano_fixed.onnx nano_int8.onnx \\
        --calibration ../shared/data/IIIT5K_train_500
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import atomic_path
from convert.rewrite_rules import producer
from infer.compare import compare_runners
from infer.onnxruntime_runner import OnnxRuntimeRunner
from models.onnx_file import check_model_output, load_onnx, read_onnx_spec
from models.spec import QUANTIZATION_METADATA_KEY, ModelSpec, quantization_of
from preprocess.batching import batch_inputs
from preprocess.lmdb_reader import default_calibration_set
from preprocess.stream import decode_all, missing_range

log = logging.getLogger(__name__)

#: The start of ONNX Runtime's root-logger warning when it quantises a model holding QDQ nodes.
_ALREADY_QUANTISED = "Please check if the model is already quantized"


class _DropRecords(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)

#: LSTM precisions of the int8 model (``--lstm``).
LSTM_PRECISIONS = ("int8", "fp32")
#: Lowest opset with per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute).
MIN_OPSET = 13


@dataclass
class CalibrationSet:
    """Prepared calibration images.

    Attributes:
        source: the lmdb folder.
        batches: float32 ``[B, C, height, W]`` normalised inputs, one width per batch.
        used: number of images in ``batches``.
        failed: ``{"index", "reason"}`` for every sample read that could not be used.
    """

    source: Path
    batches: list[np.ndarray]
    used: int
    failed: list[dict] = field(default_factory=list)


@dataclass
class QuantizationResult:
    """What :func:`quantize_model` did; also stored (without ``output``) in the metadata.

    ``frame_agreement`` is the fraction of output frames whose arg-max class is the same in
    the int8 and fp32 models on the calibration images; ``max_abs_logit_diff`` the largest
    absolute logit difference there.
    """

    output: str
    source_opset: int
    opset: int
    per_channel: bool
    reduce_range: bool
    calibration: str
    calibration_samples: int
    calibration_failed: int
    frame_agreement: float
    max_abs_logit_diff: float
    method: str = "MinMax"
    format: str = "QDQ, uint8 asymmetric activations, int8 symmetric weights"
    lstm: str = "fp32"
    padded_convs: int = 0


def load_calibration_set(lmdb_path: str | Path, spec: ModelSpec, samples: int | None = None,
                         batch_size: int = 16) -> CalibrationSet:
    """Read up to ``samples`` images (indices 1..N in order) and batch them by width.

    Raises:
        ToolchainError: ``lmdb_path`` is not an lmdb, or no image could be used.
    """
    if samples is not None and samples < 1:
        raise ToolchainError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ToolchainError(f"--batch-size must be >= 1, got {batch_size}")
    lmdb_path = Path(lmdb_path)
    found, results = decode_all(lmdb_path, spec, workers=1)
    wanted = min(found.num_samples, samples or found.num_samples)
    images, failed = [], []
    missing = missing_range(found)
    if missing and missing["index"] <= wanted:
        failed.append({**missing, "last": wanted, "count": wanted - missing["index"] + 1})
    for index, _label, pixels, _size, reason, _turn in results:
        if index > wanted:
            break
        if reason is None:
            images.append(pixels)
        else:
            failed.append({"index": index, "reason": reason})
    if not images:
        raise ToolchainError(f"{lmdb_path}: none of the first {wanted} samples could be used "
                             "for calibration (first failure: "
                             f"{failed[0]['reason'] if failed else 'none read'})")
    batches = [batch for _, batch in batch_inputs(images, spec, batch_size)]
    failed.sort(key=lambda f: f["index"])
    return CalibrationSet(lmdb_path, batches, len(images), failed)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader``: one feed per calibration batch."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self._input_name = input_name
        self._batches = batches
        self._iterator: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:
        self._iterator = iter(self._batches)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


#: ONNX Runtime's symmetric int8 convolution kernels (MLAS ``ConvSym``, the fast path of
#: ``QLinearConv`` for int8 weights with zero points 0) need a multiple of this many input
#: channels; other convolutions fall back to im2col and a general int8 GEMM.
CONV_SYM_CHANNEL_MULTIPLE = 4


def _only_consumer(tensor: gs.Tensor, node: gs.Node) -> bool:
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node


def _pre_process(fp32: Path, prepared: Path, name: str) -> None:
    """ONNX Runtime's ``quant_pre_process``; where its symbolic shape inference gives up
    (PP-OCRv4's recogniser), with ONNX's own shape inference only, which QDQ needs no more."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(prepared))
    except Exception as exc:  # noqa: BLE001 - it raises plain Exception; others re-raised
        if "symbolic shape inference" not in str(exc):
            raise
        log.info("%s: %s; using ONNX shape inference only", name, exc)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)


def pad_conv_input_channels(graph: gs.Graph, multiple: int = CONV_SYM_CHANNEL_MULTIPLE) -> int:
    """Give every QDQ convolution with int8 symmetric weights a multiple of ``multiple``
    input channels, so ONNX Runtime runs it with its symmetric int8 kernels; returns how
    many convolutions were rewritten.

    A CRNN's first convolution reads 1 (grey) or 3 (RGB) channels. Its weights
    ``[M, C, kh, kw]`` get zero filters for the added channels, and its float input
    ``[N, C, H, W]`` gets zero channels (``Pad`` before its ``QuantizeLinear``). The added
    products are all zero, so the rewritten graph computes exactly the same outputs
    (checked bit for bit on nano-ocr); only the kernel changes. Measured on nano-ocr's
    int8 model (ONNX Runtime profiler, one thread, IIIT5K): the first convolution went from
    0.83 to 0.47 s for the 3000 images. A convolution qualifies when it has one group, its
    weights are a constant int8 tensor behind a ``DequantizeLinear`` with zero points 0,
    and its input is ``DequantizeLinear(QuantizeLinear(x))`` read by nothing else.
    """
    count = 0
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        if conv.attrs.get("group", 1) != 1 or len(conv.inputs) < 2:
            continue
        x_dq = producer(conv.inputs[0], "DequantizeLinear")
        w_dq = producer(conv.inputs[1], "DequantizeLinear")
        if w_dq is None or x_dq is None:
            continue
        weight, zero = w_dq.inputs[0], (w_dq.inputs[2] if len(w_dq.inputs) > 2 else None)
        if not isinstance(weight, gs.Constant) or weight.values.dtype != np.int8 \
                or weight.values.ndim != 4 or not _only_consumer(weight, w_dq) \
                or not _only_consumer(conv.inputs[1], conv):
            continue
        if zero is not None and (not isinstance(zero, gs.Constant) or np.any(zero.values)):
            continue
        channels = weight.values.shape[1]
        padded = -(-channels // multiple) * multiple
        x_q = producer(x_dq.inputs[0], "QuantizeLinear")
        if padded == channels or x_q is None or not _only_consumer(conv.inputs[0], conv) \
                or not _only_consumer(x_dq.inputs[0], x_dq):
            continue
        values = np.zeros((weight.values.shape[0], padded, *weight.values.shape[2:]), np.int8)
        values[:, :channels] = weight.values
        w_dq.inputs[0] = gs.Constant(f"{weight.name}_padded{padded}", values)
        source = x_q.inputs[0]
        wider = gs.Variable(f"{source.name}_padded{padded}", dtype=source.dtype)
        pads = gs.Constant(f"{source.name}_pads{padded}",
                           np.array([0, 0, 0, 0, 0, padded - channels, 0, 0], np.int64))
        graph.nodes.append(gs.Node("Pad", f"{source.name}_pad{padded}", {"mode": "constant"},
                                   inputs=[source, pads], outputs=[wider]))
        x_q.inputs[0] = wider
        for stale in (x_q.outputs[0], x_dq.outputs[0], w_dq.outputs[0]):
            stale.shape = None  # channel count changed; ONNX Runtime infers it again
        count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def compare_on(
    fp32_path: Path, int8_path: Path, batches: Sequence[np.ndarray], input_name: str
) -> tuple[float, float]:
    """(frame-wise arg-max agreement, max absolute output difference) of two models, through
    ``infer.compare.compare_runners``.

    Both models take the batches (float32 ``[B, C, H, W]``) as ``input_name`` and return
    one output whose last axis is the classes.
    """
    with OnnxRuntimeRunner(fp32_path) as reference, OnnxRuntimeRunner(int8_path) as quantised:
        compared = compare_runners(reference, quantised, ({input_name: b} for b in batches))
    same = sum(c.same_argmax for c in compared)
    positions = sum(c.positions for c in compared)
    return same / positions, max((c.max_abs_diff for c in compared), default=0.0)


def quantize_model(
    source: str | Path,
    output: str | Path,
    calibration: CalibrationSet,
    per_channel: bool = True,
    reduce_range: bool = True,
    min_agreement: float = 0.95,
    lstm: str = "fp32",
    pad_channels: bool = True,
) -> QuantizationResult:
    """Quantise ``source`` (fp32 ONNX from convert.pth2onnx/convert.fix) into ``output``.

    Args:
        lstm: ``"fp32"``: the LSTM stays float. ``"int8"``: after the static pass, ONNX
            Runtime's dynamic quantisation turns each LSTM into ``DynamicQuantizeLSTM``
            (int8 weights, activations quantised with scales taken from each call's
            batch). Measured on nano-ocr: about 18 % less engine time on one thread,
            0.7883-0.7893 on IIIT5K (0.7893 with it fp32). Those scales make a sample's
            result depend on the rest of its batch (and on the engine's threads), so it is
            not the default here: a service batching requests from many clients should give
            each the same answer alone or batched. Offline scoring, where ``parse_testdata``
            and the streamed path build the same batches, uses it (``scripts/run_e2e.sh``).
            The agreement check covers the result either way.
        pad_channels: apply :func:`pad_conv_input_channels` (exact; faster on ONNX
            Runtime's CPU provider). The agreement check runs on the rewritten model.

    Raises:
        ToolchainError: ``source`` is unreadable or lacks the model description, ONNX
            Runtime's quantiser fails, or the frame agreement is below ``min_agreement``
            (``output`` is then not written).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    if lstm not in LSTM_PRECISIONS:
        raise ToolchainError(f"LSTM precision {lstm!r} is unknown; use one of {LSTM_PRECISIONS}")
    source, output = Path(source), check_model_output(output, source)
    model = load_onnx(source)
    spec = ModelSpec.from_onnx(model, str(source))  # fails early without the description
    if quantization_of(model) is not None:
        raise ToolchainError(
            f"{source} is already an int8 model (convert.quantize); "
            "quantise the fp32 model from convert.fix"
        )
    metadata = {p.key: p.value for p in model.metadata_props}
    source_opset = _opset(model)
    if source_opset < MIN_OPSET:
        log.info(
            "converting %s from opset %d to %d for quantisation",
            source.name,
            source_opset,
            MIN_OPSET,
        )
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_OPSET)
    input_name = spec.input_name
    with tempfile.TemporaryDirectory(prefix="crnn-quantize-") as tmp:
        fp32, prepared, int8 = (
            Path(tmp) / "fp32.onnx",
            Path(tmp) / "pre.onnx",
            Path(tmp) / "int8.onnx",
        )
        onnx.save(model, str(fp32))
        try:
            _pre_process(fp32, prepared, source.name)
            quantize_static(
                str(prepared),
                str(int8),
                _Reader(input_name, calibration.batches),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            if lstm == "int8":
                static, int8 = int8, Path(tmp) / "int8_lstm.onnx"
                # The static pass's QDQ nodes make ONNX Runtime warn "Please check if the
                # model is already quantized": here it is, on purpose; only the LSTM is left.
                already = _DropRecords(_ALREADY_QUANTISED)
                logging.getLogger().addFilter(already)
                try:
                    quantize_dynamic(str(static), str(int8), op_types_to_quantize=["LSTM"],
                                     weight_type=QuantType.QInt8)
                finally:
                    logging.getLogger().removeFilter(already)
        except Exception as exc:  # the quantiser raises plain ValueError/RuntimeError/ORT errors
            raise ToolchainError(f"{source}: ONNX Runtime quantisation failed ({exc})") from exc
        quantised, padded = onnx.load(str(int8)), 0
        if pad_channels:
            graph = gs.import_onnx(quantised)
            padded = pad_conv_input_channels(graph)
            if padded:
                quantised = gs.export_onnx(graph)
                onnx.save(quantised, str(int8))
        agreement, worst = compare_on(fp32, int8, calibration.batches, input_name)
        if agreement < min_agreement:
            raise ToolchainError(
                f"{source}: int8 model agrees with fp32 on only {agreement:.2%} of output frames "
                f"on {calibration.source} (minimum {min_agreement:.2%}); {output} not written. "
                "Try --per-tensor or --no-reduce-range, or calibrate on data closer to the test set"
            )
        result = QuantizationResult(
            output=str(output),
            source_opset=source_opset,
            opset=max(source_opset, MIN_OPSET),
            per_channel=per_channel,
            reduce_range=reduce_range,
            calibration=str(calibration.source),
            calibration_samples=calibration.used,
            calibration_failed=len(calibration.failed),
            frame_agreement=agreement,
            max_abs_logit_diff=worst,
            lstm="int8 dynamic (DynamicQuantizeLSTM)" if lstm == "int8" else "fp32",
            padded_convs=padded,
        )
        kept = {p.key: p.value for p in quantised.metadata_props}
        kept.update(metadata)
        kept[QUANTIZATION_METADATA_KEY] = json.dumps(
            {k: v for k, v in asdict(result).items() if k != "output"}
        )
        onnx.helper.set_model_props(quantised, kept)
        with atomic_path(output) as partial:
            onnx.save(quantised, str(partial))
    return result


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("input", type=Path, help="fp32 ONNX model (convert.fix output)")
    parser.add_argument("output", type=Path, help="int8 ONNX model to write")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=default_calibration_set(),
        help="IIIT5K-style lmdb of calibration images ($IIIT5K_CALIB_LMDB); not the test set",
    )
    parser.add_argument("--samples", type=int, help="use only the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size")
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="one scale per weight tensor instead of per output channel",
    )
    parser.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7-bit weights (safe on x86 without VNNI)",
    )
    parser.add_argument(
        "--lstm",
        choices=LSTM_PRECISIONS,
        default="fp32",
        help="fp32: keep the LSTM in float; int8: ONNX Runtime's dynamic LSTM quantisation "
        "after the static pass (faster, but its activation scales come from each batch, so "
        "a sample's result depends on its batch: batched != batch-1)",
    )
    parser.add_argument(
        "--pad-channels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give convolutions with 1 or 3 input channels zero channels up to 4, so ONNX "
        "Runtime runs them with its symmetric int8 kernels (exact; faster on the CPU)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.95,
        help="least frame-wise arg-max agreement with fp32 on the calibration images",
    )
    return parser


def _run(args) -> int:
    start = time.perf_counter()
    check_model_output(args.output, args.input)  # before the calibration's long work
    spec = read_onnx_spec(args.input)
    calibration = load_calibration_set(args.calibration, spec, args.samples, args.batch_size)
    for failure in calibration.failed[:10]:
        log.warning("calibration sample %d skipped: %s", failure["index"], failure["reason"])
    result = quantize_model(
        args.input,
        args.output,
        calibration,
        per_channel=not args.per_tensor,
        reduce_range=args.reduce_range,
        min_agreement=args.min_agreement,
        lstm=args.lstm,
        pad_channels=args.pad_channels,
    )
    print(
        f"quantised {args.input} -> {args.output} (int8 QDQ, "
        f"{'per-channel' if result.per_channel else 'per-tensor'} weights, {args.lstm} LSTM, "
        f"opset {result.opset}); "
        f"calibration {result.calibration_samples} images from {calibration.source}, "
        f"{result.calibration_failed} skipped; int8 vs fp32 there: frame agreement "
        f"{result.frame_agreement:.2%}, max |logit diff| {result.max_abs_logit_diff:.3f}; "
        f"{result.padded_convs} convolution(s) padded to a multiple of "
        f"{CONV_SYM_CHANNEL_MULTIPLE} input channels; "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
