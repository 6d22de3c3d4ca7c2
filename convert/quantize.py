"""Static int8 quantisation of a recogniser or a text detector for ONNX Runtime on CPU.

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

A detector (an ONNX file with a detector description, ``ppocr-v6-det``) is calibrated on a
folder of photos (``--calibration DIR``; default ``$DET_CALIB_IMAGES``, else the first 50 of
``../shared/data/IC15_test_even/images``), each prepared as the pipeline prepares it
(``preprocess.image.detector_input``) and run as a batch of one.

After quantising, the int8 and fp32 models are run on the calibration images and compared:
a recogniser on its frame-wise arg-max classes (the path greedy CTC decoding reads), a
detector on its probability map's pixels (on the same side of the binarisation threshold
``thresh`` in both). The tool fails if the agreement is below ``--min-agreement``.

Accuracy budget (``--target-agreement``): below it, the tool ranks the int8 model's
quantised activations by their signal-to-quantisation-noise ratio (:func:`rank_activations`)
and keeps the nodes around the 1, 2, 4, ... noisiest in fp32 (up to ``--max-fp32-tensors``),
re-quantising with the same calibration ranges, and writes the first model that meets the
target, else the one that agrees best. Each model family has a recipe (:data:`RECIPES`:
weight range, calibration range, which part stays fp32, the agreement floor and target),
measured here (docs/results/quantization.md); the flags override it.

The int8 model keeps its description metadata and records its settings under
``crnn_toolchain.quantization``: the recipe, the nodes kept in fp32 and why (the activation
and its SQNR), and each step of the search. It is for ONNX Runtime's CPU provider; give
``atc`` and the CUDA device the fp32 model.

Examples:
    python -m convert.quantize nano_fixed.onnx nano_int8.onnx \\
        --calibration ../shared/data/IIIT5K_train_500
    python -m convert.quantize ppocr-v6-rec      # into the weights cache, for the pipeline
    python -m convert.quantize ppocr-v6-det
    python -m convert.quantize ppocr-v6-rec work/v6_rec_int8.onnx --samples 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from models.cls_spec import ClassifierSpec
from models.describe import describe_onnx
from models.det_spec import Description, DetectorSpec
from models.onnx_file import check_model_output, load_onnx
from models.spec import QUANTIZATION_METADATA_KEY, ModelSpec, quantization_of
from models.weights import INT8_COPIES, fetch, int8_path
from preprocess.batching import batch_inputs
from preprocess.image import DEFAULT_MAX_PIXELS, SampleError, detector_input
from preprocess.image_folder import default_detector_calibration, read_image, scan_images
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
#: How activation ranges come from the calibration images (``--calibration-range``):
#: ``minmax``, each activation's minimum and maximum over all images; ``moving-average``, the
#: moving average (constant 0.01, ONNX Runtime's ``CalibMovingAverage``) of each batch's
#: minimum and maximum, which a few outlying images do not stretch.
CALIBRATION_RANGES = ("minmax", "moving-average")


@dataclass(frozen=True)
class Recipe:
    """How one model family is quantised; each choice measured (docs/results/quantization.md).

    Attributes:
        reduce_range: 7-bit weights (``--reduce-range``).
        calibration_range: one of :data:`CALIBRATION_RANGES`.
        fp32_from: an op type: its first node (in the graph's topological order) and every
            node after it stay fp32 (a recogniser's sequence model), or None.
        min_agreement: the least agreement with fp32 written.
        target_agreement: the accuracy budget the sensitivity search aims at, or None for
            no search.
        max_fp32_tensors: the most activations the search keeps in fp32.
        calibration_samples: images to calibrate on when ``--samples`` is not given (None:
            all).
        why: the measurements behind the recipe, recorded with the model.
    """

    reduce_range: bool = True
    calibration_range: str = "minmax"
    fp32_from: str | None = None
    min_agreement: float = 0.95
    target_agreement: float | None = None
    max_fp32_tensors: int = 8
    calibration_samples: int | None = None
    why: str = "the CRNN default: every Conv and MatMul int8, the LSTM fp32"


#: Recipes by the description's ``arch``; any other model gets ``Recipe()``.
RECIPES: dict[str, Recipe] = {
    "ppocr-v6-rec": Recipe(
        reduce_range=False, calibration_range="moving-average", fp32_from="MatMul",
        min_agreement=0.98,
        why="IIIT5K 0.9600 against fp32 0.9627 (every op int8 with min-max ranges and 7-bit "
            "weights: 0.9510); the sequence model (from the first MatMul) in int8 saves no "
            "time and costs 0.5 points. No search: reaching 99.04 % frame agreement on the "
            "calibration images took 8 activations fp32 and read IIIT5K 0.9550, 13 % slower"),
    "ppocr-v4-rec": Recipe(
        reduce_range=False, calibration_range="moving-average", fp32_from="MatMul",
        min_agreement=0.95, target_agreement=0.99,
        why="with min-max ranges only 0.83-0.86 of frames agree (IIIT5K 0.25-0.35); moving-"
            "average ranges give 0.96"),
    "ppocr-v6-det": Recipe(
        reduce_range=False, min_agreement=0.995, target_agreement=0.999,
        calibration_samples=50,
        why="every op int8, 8-bit weights, min-max ranges: det H-mean on IC15_test_even "
            "0.7427 against fp32 0.7360 (7-bit weights 0.7326, moving-average ranges 0.7323); "
            "calibrated on its first 50 images"),
}


def recipe_for(spec: Description) -> Recipe:
    """The recipe of a model's description (:data:`RECIPES`, else ``Recipe()``)."""
    return RECIPES.get(spec.arch, Recipe())


#: Lowest opset with per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute).
MIN_OPSET = 13


@dataclass
class CalibrationSet:
    """Prepared calibration images.

    Attributes:
        source: the lmdb folder (a recogniser) or the folder of photos (a detector).
        batches: float32 ``[B, C, height, W]`` normalised inputs, one width per batch (a
            detector: one photo per batch, ``[1, 3, H, W]``).
        used: number of images in ``batches``.
        failed: ``{"index", "reason"}`` for every sample read that could not be used (a
            photo: with its file name as ``"image"``).
        threshold: where the outputs are compared by side, not by arg-max: the detector's
            binarisation threshold; None for a recogniser.
    """

    source: Path
    batches: list[np.ndarray]
    used: int
    failed: list[dict] = field(default_factory=list)
    threshold: float | None = None


@dataclass
class QuantizationResult:
    """What :func:`quantize_model` did; also stored (without ``output``) in the metadata.

    ``agreement`` is, on the calibration images, the fraction of output frames whose arg-max
    class is the same in the int8 and fp32 models (a recogniser), or of probability-map
    pixels on the same side of the binarisation threshold in both (a detector), as
    ``agreement_of`` says; ``max_abs_output_diff`` the largest absolute output difference.
    ``fp32_nodes`` lists the nodes kept in fp32 with why; ``search`` each step of the
    sensitivity search (activations kept in fp32, agreement); ``training`` what
    quantisation-aware training did before (``train.qat``), else None.
    """

    output: str
    source_opset: int
    opset: int
    per_channel: bool
    reduce_range: bool
    calibration: str
    calibration_samples: int
    calibration_failed: int
    agreement: float
    agreement_of: str
    max_abs_output_diff: float
    calibration_range: str = "minmax"
    format: str = "QDQ, uint8 asymmetric activations, int8 symmetric weights"
    lstm: str = "fp32"
    padded_convs: int = 0
    recipe: str = ""
    fp32_from: str | None = None
    target_agreement: float | None = None
    fp32_nodes: list[dict] = field(default_factory=list)
    search: list[dict] = field(default_factory=list)
    training: dict | None = None


def load_calibration_set(lmdb_path: str | Path, spec: Description, samples: int | None = None,
                         batch_size: int = 16) -> CalibrationSet:
    """Read up to ``samples`` images (indices 1..N in order) and batch them by width; for a
    detector (``spec`` a ``DetectorSpec``), :func:`load_detector_calibration` on a folder of
    photos.

    Raises:
        ToolchainError: ``lmdb_path`` is not an lmdb (a folder, for a detector), or no image
            could be used.
    """
    if samples is not None and samples < 1:
        raise ToolchainError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ToolchainError(f"--batch-size must be >= 1, got {batch_size}")
    if isinstance(spec, DetectorSpec):
        return load_detector_calibration(lmdb_path, spec, samples)
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


def load_detector_calibration(folder: str | Path, spec: DetectorSpec,
                              samples: int | None = None) -> CalibrationSet:
    """The first ``samples`` photos of ``folder`` (natural order, ``preprocess.image_folder``),
    each prepared as the pipeline prepares it (``preprocess.image.detector_input``) and
    batched alone (sizes differ). A photo that cannot be read is recorded with its reason.

    Raises:
        ToolchainError: not a folder of images, or no photo could be used.
    """
    folder = Path(folder)
    files, skipped = scan_images(folder)
    failed = [{"index": 0, "image": entry["image"], "reason": entry["reason"]}
              for entry in skipped]
    batches = []
    for index, path in enumerate(files[:samples], start=1):
        try:
            batches.append(detector_input(read_image(path, DEFAULT_MAX_PIXELS), spec)[None])
        except SampleError as exc:
            failed.append({"index": index, "image": path.name, "reason": str(exc)})
    if not batches:
        raise ToolchainError(f"{folder}: none of the first {len(files[:samples])} photos could "
                             f"be used for calibration (first failure: {failed[0]['reason']})")
    return CalibrationSet(folder, batches, len(batches), failed, threshold=spec.thresh)


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


def _at_min_opset(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` converted to :data:`MIN_OPSET` where its opset is below."""
    opset = _opset(model)
    if opset >= MIN_OPSET:
        return model
    log.info("converting %s from opset %d to %d for quantisation", name, opset, MIN_OPSET)
    from onnx import version_converter

    return version_converter.convert_version(model, MIN_OPSET)


def prepare_graph(source: Path, prepared: Path) -> None:
    """Write the fp32 graph that ONNX Runtime quantises ``source`` as: at opset >= 13,
    through ``quant_pre_process`` (BatchNormalization folded into Conv, constants folded),
    every node named (an unnamed one ``OP:first output``), metadata kept. Quantising it again
    changes no node name, so an int8 model made from it names its nodes (what
    ``models.fake_quant.read_qdq`` keys on); ``train.qat`` trains it.

    Raises:
        ToolchainError: ``source`` is unreadable.
    """
    model = _at_min_opset(load_onnx(source), source.name)
    with tempfile.TemporaryDirectory(prefix="crnn-prepare-") as tmp:
        fp32, done = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(fp32))
        _pre_process(fp32, done, source.name)
        model = onnx.load(str(done))
    for node in model.graph.node:
        if not node.name:
            node.name = f"{node.op_type}:{node.output[0]}"
    onnx.save(model, str(prepared))


def _pre_process(fp32: Path, prepared: Path, name: str) -> None:
    """ONNX Runtime's ``quant_pre_process``; where its symbolic shape inference gives up
    (PP-OCRv4's recogniser), with ONNX's own shape inference only, which QDQ needs no more."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Where symbolic shape inference gives up, ONNX Runtime saves its partial model as
    # sym_shape_infer_temp.onnx (and its external data) in the working folder: run it in
    # the temporary folder ``prepared`` lives in, so nothing lands in the caller's.
    with contextlib.chdir(prepared.parent):
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
    (checked bit for bit on nano-ocr, and on PP-OCRv4's recogniser run unfused); only the
    kernel changes. On CPUs without VNNI, ONNX Runtime's u8s8 kernels add channels in
    saturating pairs (AVX2's ``vpmaddubsw``), so there the fused int8 kernel may round a
    padded convolution differently from the unpadded one. Measured on nano-ocr's
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
    fp32_path: Path, int8_path: Path, batches: Sequence[np.ndarray], input_name: str,
    threshold: float | None = None,
) -> tuple[float, float]:
    """(agreement, max absolute output difference) of two models, through
    ``infer.compare.compare_runners``: the frame-wise arg-max agreement, or with
    ``threshold`` the fraction of output elements on the same side of it in both.

    Both models take the batches (float32 ``[B, C, H, W]``) as ``input_name`` and return
    one output (a recogniser's last axis the classes; a detector's ``[B, 1, H, W]`` map).
    """
    with OnnxRuntimeRunner(fp32_path) as reference, OnnxRuntimeRunner(int8_path) as quantised:
        compared = compare_runners(reference, quantised, ({input_name: b} for b in batches),
                                   threshold=threshold)
    if threshold is None:
        same, total = sum(c.same_argmax for c in compared), sum(c.positions for c in compared)
    else:
        same, total = sum(c.same_side for c in compared), sum(c.elements for c in compared)
    return same / total, max((c.max_abs_diff for c in compared), default=0.0)


@dataclass(frozen=True)
class Sensitivity:
    """One quantised activation of an int8 model and how much quantising it loses.

    Attributes:
        tensor: the activation's name in the fp32 graph.
        sqnr_db: signal-to-quantisation-noise ratio of the activation before and after its
            QuantizeLinear/DequantizeLinear pair, over the images ranked on:
            ``20 log10(|x| / |x - dq(q(x))|)`` (ONNX Runtime's ``qdq_loss_debug``); lower
            is noisier.
        nodes: the nodes that produce or read it, which stay fp32 to keep it float.
    """

    tensor: str
    sqnr_db: float
    nodes: tuple[str, ...]


#: Activation functions ONNX Runtime's QDQ quantiser folds into the QuantizeLinear after
#: them (their output's range already clips): the tensor before the pair is then the
#: activation's input, so the ranking applies them before comparing.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")


def _folded(node: onnx.NodeProto, constants: dict[str, np.ndarray]):
    """The function of a folded activation node (Relu, Clip with constant bounds), or None."""
    if node.op_type == "Relu":
        return lambda x: np.maximum(x, 0)
    bounds = [constants.get(name) for name in node.input[1:3]]
    if node.op_type == "Clip" and all(b is not None for b in bounds):
        low = bounds[0] if len(bounds) > 0 else None
        high = bounds[1] if len(bounds) > 1 else None
        return lambda x: np.clip(x, low, high)
    return None


def rank_activations(prepared: Path, int8: Path, feeds: Sequence[dict[str, np.ndarray]],
                     work: Path) -> list[Sensitivity]:
    """The quantised activations of ``int8`` (quantised from ``prepared``), noisiest first.

    ONNX Runtime's ``qdq_loss_debug`` runs ``int8`` with every QuantizeLinear input and
    DequantizeLinear output as an extra output on ``feeds``; each activation's SQNR compares
    the tensor before its QDQ pair with the tensor after it (:class:`Sensitivity`). This is
    the noise quantising that activation adds where it stands, not the error accumulated
    from the layers before it, so one run ranks every activation.

    Args:
        prepared: the fp32 graph that was quantised (node and tensor names).
        int8: the QDQ model.
        feeds: input name -> float32 batch; keep them few (every activation is held).
        work: a folder for the augmented model.
    """
    from onnxruntime.quantization import qdq_loss_debug

    graph = onnx.load(str(prepared)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    producers = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    augmented = work / "int8_activations.onnx"
    qdq_loss_debug.modify_model_output_intermediate_tensors(str(int8), str(augmented))
    activations = qdq_loss_debug.collect_activations(str(augmented), list(feeds))
    ranked = []
    for name, pair in qdq_loss_debug.create_activation_matching(activations).items():
        if name not in producers and name not in consumers:
            continue  # not an activation of the fp32 graph
        before, after = pair["pre_qdq"], pair["post_qdq"]
        producer = producers.get(name)
        if producer is not None and producer.op_type in _FOLDED_ACTIVATIONS:
            activation = _folded(producer, constants)
            if activation is None:
                continue
            before = [activation(x) for x in before]
        sqnr = qdq_loss_debug.compute_signal_to_quantization_noice_ratio(before, after)
        nodes = [n.name for n in [producer, *consumers.get(name, [])] if n is not None]
        ranked.append(Sensitivity(name, float(sqnr), tuple(dict.fromkeys(nodes))))
    ranked.sort(key=lambda s: s.sqnr_db)
    return ranked


def _nodes_from(nodes: Sequence[onnx.NodeProto], op_type: str, source: str) -> list[str]:
    """Names of the first ``op_type`` node of ``nodes`` (topological order) and every node
    after it.

    Raises:
        ToolchainError: no ``op_type`` node.
    """
    first = next((i for i, node in enumerate(nodes) if node.op_type == op_type), None)
    if first is None:
        raise ToolchainError(f"{source}: no {op_type} node to keep in fp32 from")
    return [node.name for node in nodes[first:]]


def _named(prepared: Path) -> list[onnx.NodeProto]:
    """Give every unnamed node of ``prepared`` a name (exclusions go by name), saving it
    where one was unnamed; returns its nodes."""
    model = onnx.load(str(prepared))
    nodes = list(model.graph.node)
    unnamed = [i for i, node in enumerate(nodes) if not node.name]
    for i in unnamed:
        nodes[i].name = f"{nodes[i].op_type}_{i}"
    if unnamed:
        onnx.save(model, str(prepared))
    return nodes


def quantize_model(
    source: str | Path,
    output: str | Path,
    calibration: CalibrationSet,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    min_agreement: float | None = None,
    lstm: str = "fp32",
    pad_channels: bool = True,
    *,
    recipe: Recipe | None = None,
    ranges: Path | None = None,
    fp32_nodes: list[dict] | None = None,
    reference: Path | None = None,
    training: dict | None = None,
) -> QuantizationResult:
    """Quantise ``source`` (an fp32 recogniser or detector ONNX file carrying its
    description) into ``output``.

    Args:
        reduce_range, min_agreement: override the recipe's.
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
        recipe: how to quantise (default: :func:`recipe_for` the description).
        ranges: ONNX Runtime's calibration cache (JSON, activation name -> range): read
            where it exists (no calibration runs), else written there; default: a
            temporary one.
        fp32_nodes: keep these nodes fp32 (``QuantizationResult.fp32_nodes`` of an earlier
            run on the same graph) instead of the recipe's and the search's choice.
        reference: the fp32 model the agreement is measured against (default: ``source``);
            quantisation-aware training measures its int8 model against the model it
            started from.
        training: recorded as ``training`` in the result and the model's metadata.

    Raises:
        ToolchainError: ``source`` is unreadable, lacks a recogniser or detector description,
            is already int8; ONNX Runtime's quantiser fails; or the agreement is below the
            minimum (``output`` is then not written).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if lstm not in LSTM_PRECISIONS:
        raise ToolchainError(f"LSTM precision {lstm!r} is unknown; use one of {LSTM_PRECISIONS}")
    source, output = Path(source), check_model_output(output, source)
    spec = _description(source)
    recipe = recipe or recipe_for(spec)
    if recipe.calibration_range not in CALIBRATION_RANGES:
        raise ToolchainError(f"calibration range {recipe.calibration_range!r} is unknown; "
                             f"use one of {CALIBRATION_RANGES}")
    reduce_range = recipe.reduce_range if reduce_range is None else reduce_range
    min_agreement = recipe.min_agreement if min_agreement is None else min_agreement
    model = load_onnx(source)
    if quantization_of(model) is not None:
        raise ToolchainError(
            f"{source} is already an int8 model (convert.quantize); "
            "quantise the fp32 model from convert.fix"
        )
    metadata = {p.key: p.value for p in model.metadata_props}
    source_opset = _opset(model)
    model = _at_min_opset(model, source.name)
    input_name = spec.input_name
    threshold = calibration.threshold
    agreement_of = ("frames whose arg-max class matches" if threshold is None else
                    f"probability-map pixels on the same side of {threshold:g}")
    with tempfile.TemporaryDirectory(prefix="crnn-quantize-") as tmp:
        work = Path(tmp)
        fp32, prepared = work / "fp32.onnx", work / "pre.onnx"
        cache = ranges or work / "ranges.json"
        onnx.save(model, str(fp32))
        compared = reference or fp32
        kept_fp32 = list(fp32_nodes or [])

        def quantise(exclude: Sequence[str], name: str) -> Path:
            int8 = work / name
            _quantize_static(prepared, int8, calibration, input_name, recipe, per_channel,
                             reduce_range, list(exclude), cache)
            return int8

        try:
            _pre_process(fp32, prepared, source.name)
            nodes = _named(prepared)
            has_lstm = any(node.op_type == "LSTM" for node in nodes)
            if fp32_nodes is not None:
                base = list(dict.fromkeys(n for entry in fp32_nodes for n in entry["nodes"]))
            elif recipe.fp32_from:
                base = _nodes_from(nodes, recipe.fp32_from, source.name)
                kept_fp32.append({"nodes": base,
                                  "why": f"from the first {recipe.fp32_from} on ({recipe.why})"})
            else:
                base = []
            int8 = quantise(base, "int8_0.onnx")
            search = []  # step 0 is the final check's agreement where no search may run
            target = None if fp32_nodes is not None else recipe.target_agreement
            if target is not None and recipe.max_fp32_tensors > 0:
                agreement, _ = compare_on(compared, int8, calibration.batches, input_name,
                                          threshold)
                search.append({"fp32_tensors": 0, "agreement": agreement})
            if search and agreement < target:
                int8, agreement, chosen = _search(
                    compared, prepared, int8, agreement, calibration, input_name, recipe, base,
                    quantise, search, work)
                kept_fp32 += [{"tensor": s.tensor, "sqnr_db": round(s.sqnr_db, 2),
                               "nodes": list(s.nodes),
                               "why": "one of the noisiest activations (sensitivity search)"}
                              for s in chosen]
            if lstm == "int8":
                static, int8 = int8, work / "int8_lstm.onnx"
                # The static pass's QDQ nodes make ONNX Runtime warn "Please check if the
                # model is already quantized": here it is, on purpose; only the LSTM is left.
                already = _DropRecords(_ALREADY_QUANTISED)
                logging.getLogger().addFilter(already)
                try:
                    quantize_dynamic(str(static), str(int8), op_types_to_quantize=["LSTM"],
                                     weight_type=QuantType.QInt8)
                finally:
                    logging.getLogger().removeFilter(already)
        except ToolchainError:
            raise
        except Exception as exc:  # the quantiser raises plain ValueError/RuntimeError/ORT errors
            raise ToolchainError(f"{source}: ONNX Runtime quantisation failed ({exc})") from exc
        quantised, padded = onnx.load(str(int8)), 0
        if pad_channels:
            graph = gs.import_onnx(quantised)
            padded = pad_conv_input_channels(graph)
            if padded:
                quantised = gs.export_onnx(graph)
                int8 = work / "int8_final.onnx"
                onnx.save(quantised, str(int8))
        agreement, worst = compare_on(compared, int8, calibration.batches, input_name,
                                      threshold)
        search = search or [{"fp32_tensors": 0, "agreement": agreement}]
        if agreement < min_agreement:
            raise ToolchainError(
                f"{source}: int8 model agrees with fp32 on only {agreement:.2%} of "
                f"{agreement_of} on {calibration.source} (minimum {min_agreement:.2%}); "
                f"{output} not written. Try --per-tensor, --no-reduce-range, "
                "--calibration-range moving-average, or calibrate on data closer to the test set"
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
            agreement=agreement,
            agreement_of=agreement_of,
            max_abs_output_diff=worst,
            calibration_range=recipe.calibration_range,
            lstm=("none" if not has_lstm else
                  "int8 dynamic (DynamicQuantizeLSTM)" if lstm == "int8" else "fp32"),
            padded_convs=padded,
            recipe=recipe.why,
            fp32_from=recipe.fp32_from,
            target_agreement=recipe.target_agreement,
            fp32_nodes=kept_fp32,
            search=search,
            training=training,
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


def _description(source: Path) -> ModelSpec | DetectorSpec:
    """The recogniser or detector description of ``source``.

    Raises:
        ToolchainError: unreadable, no description, or a classifier's.
    """
    spec = describe_onnx(source)
    if isinstance(spec, ClassifierSpec):
        raise ToolchainError(f"{source}: a text-direction classifier; convert.quantize takes "
                             "recognisers and detectors")
    return spec


def _quantize_static(prepared: Path, int8: Path, calibration: CalibrationSet, input_name: str,
                     recipe: Recipe, per_channel: bool, reduce_range: bool,
                     exclude: list[str], cache: Path) -> None:
    """ONNX Runtime's ``quantize_static`` (QDQ, uint8 activations, int8 weights, MinMax
    calibration over the recipe's ranges), keeping ``exclude`` fp32. The activation ranges
    are computed once and kept in ``cache``, so later calls with other exclusions do not
    calibrate again."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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
        nodes_to_exclude=exclude,
        calibration_cache_path=str(cache),
        extra_options={"CalibMovingAverage": recipe.calibration_range == "moving-average"},
    )


#: Calibration batches the sensitivity ranking runs on (every activation of each is held).
RANKING_BATCHES = 8


def _search(fp32: Path, prepared: Path, int8: Path, agreement: float,
            calibration: CalibrationSet, input_name: str, recipe: Recipe, base: list[str],
            quantise, search: list[dict], work: Path):
    """The sensitivity search: keep the nodes around the 1, 2, 4, ... noisiest activations
    in fp32 until the agreement reaches the recipe's target (or ``max_fp32_tensors``).

    Returns:
        (the chosen model, its agreement, the activations it keeps in fp32): the first that
        meets the target, else the best (the fewest activations among equals).
    """
    ranking_batches = 2 if calibration.threshold is not None else RANKING_BATCHES
    feeds = [{input_name: b} for b in _largest(calibration.batches, ranking_batches)]
    ranked = rank_activations(prepared, int8, feeds, work)
    best = (agreement, int8, [])
    count = 1
    while count <= min(recipe.max_fp32_tensors, len(ranked)):
        chosen = ranked[:count]
        exclude = list(dict.fromkeys([*base, *(n for s in chosen for n in s.nodes)]))
        candidate = quantise(exclude, f"int8_{count}.onnx")
        found, _ = compare_on(fp32, candidate, calibration.batches, input_name,
                              calibration.threshold)
        search.append({"fp32_tensors": count, "agreement": found,
                       "tensors": [s.tensor for s in chosen]})
        log.info("sensitivity search: %d activation(s) fp32 -> agreement %.4f", count, found)
        if found > best[0]:
            best = (found, candidate, chosen)
        if found >= recipe.target_agreement:
            break
        count *= 2
    return best[1], best[0], best[2]


def _largest(batches: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    """The ``count`` batches with the most images (in their order)."""
    order = sorted(range(len(batches)), key=lambda i: -batches[i].shape[0])[:count]
    return [batches[i] for i in sorted(order)]


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("input",
                        help="fp32 ONNX recogniser (convert.fix output) or detector; or a "
                             f"registry name with an int8 copy ({', '.join(INT8_COPIES)}): "
                             "its int8 copy is written into the weights cache, where the "
                             "pipeline and the service take it")
    parser.add_argument("output", type=Path, nargs="?",
                        help="int8 ONNX model to write (default for a registry name: its "
                             "place in the weights cache)")
    parser.add_argument(
        "--calibration",
        type=Path,
        help="a recogniser's: IIIT5K-style lmdb ($IIIT5K_CALIB_LMDB, else "
        "../shared/data/IIIT5K_train_500); a detector's: folder of photos ($DET_CALIB_IMAGES, "
        "else ../shared/data/IC15_test_even/images); not the images you score on",
    )
    parser.add_argument("--samples", type=int,
                        help="use only the first N images (default: the recipe's, else all)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size")
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="one scale per weight tensor instead of per output channel",
    )
    parser.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights (safe on x86 without VNNI; default: the recipe's)",
    )
    parser.add_argument("--calibration-range", choices=CALIBRATION_RANGES,
                        help="activation ranges: min-max over all images, or the moving "
                        "average of each batch's (default: the recipe's)")
    parser.add_argument("--fp32-from", metavar="OP",
                        help="keep the first OP node and everything after it fp32 ('none': "
                        "nothing; default: the recipe's)")
    parser.add_argument("--target-agreement", type=float,
                        help="accuracy budget: below it, keep the noisiest activations fp32 "
                        "('0' turns the search off; default: the recipe's)")
    parser.add_argument("--max-fp32-tensors", type=int,
                        help="the most activations the search keeps fp32 (default: the "
                        "recipe's)")
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
        help="least agreement with fp32 on the calibration images (default: the recipe's)",
    )
    return parser


def recipe_of(spec: Description, args) -> Recipe:
    """The description's recipe with the command line's overrides."""
    recipe = recipe_for(spec)
    changes = {}
    if args.calibration_range is not None:
        changes["calibration_range"] = args.calibration_range
    if args.fp32_from is not None:
        changes["fp32_from"] = None if args.fp32_from.lower() == "none" else args.fp32_from
    if args.target_agreement is not None:
        changes["target_agreement"] = args.target_agreement or None
    if args.max_fp32_tensors is not None:
        if args.max_fp32_tensors < 0:
            raise ToolchainError(f"--max-fp32-tensors must be >= 0, got {args.max_fp32_tensors}")
        changes["max_fp32_tensors"] = args.max_fp32_tensors
    return replace(recipe, **changes)


def _run(args) -> int:
    start = time.perf_counter()
    if args.input in INT8_COPIES:
        built_by = INT8_COPIES[args.input]
        if args.output is None and not built_by.startswith("python -m convert.quantize"):
            raise ToolchainError(
                f"{args.input}: post-training quantisation does not hold its accuracy budget "
                f"(docs/results/quantization.md); its int8 copy is built by `{built_by}` (give "
                "an output path to write a post-training int8 model anyway)")
        args.output = args.output or int8_path(args.input)
        args.input = fetch(args.input)
    elif args.output is None:
        if not Path(args.input).exists():
            raise ToolchainError(f"{args.input}: no such file, and not a model with an int8 "
                                 f"copy in the weights cache ({', '.join(INT8_COPIES)})")
        raise ToolchainError(f"{args.input}: give the int8 model to write (an output is "
                             f"optional only for {', '.join(INT8_COPIES)})")
    args.input = Path(args.input)
    check_model_output(args.output, args.input)  # before the calibration's long work
    spec = _description(args.input)
    recipe = recipe_of(spec, args)
    detector = isinstance(spec, DetectorSpec)
    source = args.calibration or (default_detector_calibration() if detector
                                  else default_calibration_set())
    samples = recipe.calibration_samples if args.samples is None else args.samples
    calibration = load_calibration_set(source, spec, samples, args.batch_size)
    for failure in calibration.failed[:10]:
        log.warning("calibration %s skipped: %s",
                    failure.get("image") or f"sample {failure['index']}", failure["reason"])
    result = quantize_model(
        args.input,
        args.output,
        calibration,
        per_channel=not args.per_tensor,
        reduce_range=args.reduce_range,
        min_agreement=args.min_agreement,
        lstm=args.lstm,
        pad_channels=args.pad_channels,
        recipe=recipe,
    )
    kept = len({name for entry in result.fp32_nodes for name in entry["nodes"]})
    print(
        f"quantised {args.input} -> {args.output} (int8 QDQ, "
        f"{'per-channel' if result.per_channel else 'per-tensor'} "
        f"{'7' if result.reduce_range else '8'}-bit weights, {result.calibration_range} "
        f"ranges, {'' if result.lstm == 'none' else f'{args.lstm} LSTM, '}opset {result.opset}, "
        f"{kept} node(s) kept fp32 by the recipe or the search); "
        f"calibration {result.calibration_samples} images from {calibration.source}, "
        f"{result.calibration_failed} skipped; int8 vs fp32 there: {result.agreement:.2%} of "
        f"{result.agreement_of}, max |output diff| {result.max_abs_output_diff:.3f}; "
        f"{result.padded_convs} convolution(s) padded to a multiple of "
        f"{CONV_SYM_CHANNEL_MULTIPLE} input channels; "
        f"{time.perf_counter() - start:.1f} s"
    )
    for step in result.search[1:]:
        print(f"  sensitivity search: {step['fp32_tensors']} activation(s) fp32 -> "
              f"{step['agreement']:.2%}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
