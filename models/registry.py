"""The architectures this toolchain knows: one entry each (doctr ``default_cfgs`` style).

An entry holds everything that is particular to one architecture: its default
:class:`models.spec.ModelSpec`, the PyTorch builder (None for a model shipped only as ONNX),
the recurrent layouts its checkpoints come in, and where its public weights come from.
Builders import torch on first use, so reading the registry stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.errors import ToolchainError
from models.cls_spec import ClassifierSpec
from models.det_spec import DetectorSpec
from models.spec import ModelSpec

#: Gate orders of stored LSTM weights (``models.checkpoint``); PyTorch's is "ifgo", Ascend's
#: NPU-trained ModelZoo checkpoints store "igfo".
GATE_ORDERS = ("ifgo", "igfo")


@dataclass(frozen=True)
class WeightSource:
    """A model file shipped inside a PyPI wheel.

    Attributes:
        package, version: the wheel (``pip download --no-deps package==version``).
        member: the file's path inside the wheel.
        sha256: hex digest of that member.
        license: the wheel's licence.
        filename: name of the file written into the weights cache.
    """

    package: str
    version: str
    member: str
    sha256: str
    license: str
    filename: str


@dataclass(frozen=True)
class ArchEntry:
    """One architecture.

    Attributes:
        name: the registry key (``--arch``).
        summary: one line for help texts and docs/reference.md.
        spec: the default description. For a foreign model whose charset ships with its
            weights, ``alphabet`` is empty here and filled by ``models.weights fetch``.
        build: ``(spec, rnn_layout) -> torch.nn.Module`` in eval mode, or None.
        rnn_layouts: checkpoint layouts of the recurrent part (the first is the default).
        weights: public weights, or None.
    """

    name: str
    summary: str
    spec: ModelSpec
    build: Callable[[ModelSpec, str], object] | None = None
    rnn_layouts: tuple[str, ...] = ("meijieru",)
    weights: WeightSource | None = None


def _build_crnn(spec: ModelSpec, rnn_layout: str):
    from models.networks import CRNN

    return CRNN(spec.num_classes, layout=rnn_layout).eval()


def _build_crnn_small(spec: ModelSpec, rnn_layout: str):
    from models.networks import CRNN

    return CRNN(spec.num_classes, layout=rnn_layout, hidden=128, width=32).eval()


def _build_nano(spec: ModelSpec, rnn_layout: str):
    from models.networks import NanoOCR

    return NanoOCR(spec.num_classes).eval()


def _ppocr_rec_spec(arch: str, output_name: str) -> ModelSpec:
    """A PP-OCR CTC recogniser's description (PP-OCRv4 and v6 share it): input ``x`` float32
    ``[N, 3, 48, W]``, ``(x/255 - 0.5)/0.5`` on BGR pixels (PaddleOCR reads images with
    cv2.imread); output softmax probabilities ``[N, W // 8, classes]``; blank 0; the charset
    comes with the weights (``models.weights`` fills it). The width policy, keep-ratio [96,
    480], was chosen for each with `python -m bench.width_policy`: see
    docs/results/README.md."""
    return ModelSpec(arch=arch, alphabet="", input_name="x", output_name=output_name,
                     height=48, channels=3, channel_order="bgr", width_policy="keep-ratio",
                     width=320, min_width=96, max_width=480, output_layout="NTC",
                     output_kind="probabilities", downsample=8, frame_offset=0,
                     min_input_width=8)


ARCHS: dict[str, ArchEntry] = {
    entry.name: entry
    for entry in (
        ArchEntry(
            name="crnn",
            summary="reference CRNN (Shi et al. 2017; crnn.pytorch, Ascend ModelZoo), 0-9a-z",
            # Trained at 32x100 on lower-case alphanumerics.
            spec=ModelSpec(
                arch="crnn",
                alphabet="0123456789abcdefghijklmnopqrstuvwxyz",
                width_policy="fixed",
                width=100,
                min_width=32,
                max_width=320,
            ),
            build=_build_crnn,
            rnn_layouts=("meijieru", "modelzoo"),
        ),
        ArchEntry(
            name="crnn-small",
            summary="the reference CRNN at half the channels (32..256, hidden 128), for "
                    "training from scratch on a CPU; 0-9a-z",
            spec=ModelSpec(
                arch="crnn-small",
                alphabet="0123456789abcdefghijklmnopqrstuvwxyz",
                width_policy="keep-ratio",
                width=100,
                min_width=32,
                max_width=256,
            ),
            build=_build_crnn_small,
            rnn_layouts=("meijieru", "modelzoo"),
        ),
        ArchEntry(
            name="nano-ocr",
            summary="nano-ocr 0.1.0 CRNN (MIT), 65 characters",
            # Trained at fixed 32x128 with bilinear resizing. The default policy, keep-ratio
            # clamped to [96, 192], was chosen by measurement on IIIT5K (`python -m
            # bench.width_policy`): 0.7927 against 0.7760 for fixed 128; see docs/results/README.md.
            spec=ModelSpec(
                arch="nano-ocr",
                alphabet="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.- ",
                width_policy="keep-ratio",
                width=128,
                min_width=96,
                max_width=192,
            ),
            build=_build_nano,
            weights=WeightSource(
                package="nano-ocr",
                version="0.1.0",
                member="nano_ocr/model/nano_ocr_ftr.pth",
                sha256="2d105c6901b4afe816fe8f85aa32ef85a6336f2e4d96c04692bb08b7de9758ba",
                license="MIT",
                filename="nano_ocr_ftr.pth",
            ),
        ),
        ArchEntry(
            name="ppocr-v4-rec",
            summary="PP-OCRv4 recogniser (SVTR-LCNet, CTC; Apache-2.0), RapidOCR 1.4.4, 6624 chars",
            # 6625 classes: the charset in the ONNX metadata key `character` plus a space,
            # appended last.
            spec=_ppocr_rec_spec("ppocr-v4-rec", "softmax_11.tmp_0"),
            weights=WeightSource(
                package="rapidocr-onnxruntime",
                version="1.4.4",
                member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                license="Apache-2.0",
                filename="ppocr_v4_rec.onnx",
            ),
        ),
        ArchEntry(
            name="ppocr-v6-rec",
            summary="PP-OCRv6 small recogniser (CTC; Apache-2.0), RapidOCR 3.10.0, 18709 chars",
            # 18710 classes: the charset in the ONNX metadata key `character` plus a space,
            # appended last.
            spec=_ppocr_rec_spec("ppocr-v6-rec", "fetch_name_0"),
            weights=WeightSource(
                package="rapidocr",
                version="3.10.0",
                member="rapidocr/models/PP-OCRv6_rec_small.onnx",
                sha256="6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
                license="Apache-2.0",
                filename="ppocr_v6_rec.onnx",
            ),
        ),
    )
}


@dataclass(frozen=True)
class DetectorEntry:
    """One text detector: its default description and public weights."""

    name: str
    summary: str
    spec: DetectorSpec
    weights: WeightSource | None = None


DETECTORS: dict[str, DetectorEntry] = {
    entry.name: entry
    for entry in (
        DetectorEntry(
            name="ppocr-v4-det",
            summary="PP-OCRv4 DB text detector (Apache-2.0), RapidOCR 1.4.4",
            # Input x float32 [N, 3, H, W], H and W multiples of 32; output the text
            # probability map [N, 1, H, W]. Normalisation, resize rule and DB settings were
            # chosen by measurement on IC15 (docs/usage.md, "Choices, measured").
            spec=DetectorSpec(arch="ppocr-v4-det"),
            weights=WeightSource(
                package="rapidocr-onnxruntime",
                version="1.4.4",
                member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                license="Apache-2.0",
                filename="ppocr_v4_det.onnx",
            ),
        ),
        DetectorEntry(
            name="ppocr-v6-det",
            summary="PP-OCRv6 small DB text detector (Apache-2.0), RapidOCR 3.10.0",
            # Input x float32 [N, 3, H, W], H and W multiples of 32; output the text
            # probability map [N, 1, H, W]. Normalisation, resize rule and DB settings were
            # chosen on a tuning half of IC15_test_even, checked on the other half (`python -m
            # bench.det_tune`): see docs/results/README.md.
            spec=DetectorSpec(arch="ppocr-v6-det", output_name="fetch_name_0", box_thresh=0.5),
            weights=WeightSource(
                package="rapidocr",
                version="3.10.0",
                member="rapidocr/models/PP-OCRv6_det_small.onnx",
                sha256="090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
                license="Apache-2.0",
                filename="ppocr_v6_det.onnx",
            ),
        ),
    )
}


@dataclass(frozen=True)
class ClassifierEntry:
    """One image classifier: its default description and public weights."""

    name: str
    summary: str
    spec: ClassifierSpec
    weights: WeightSource | None = None


CLASSIFIERS: dict[str, ClassifierEntry] = {
    entry.name: entry
    for entry in (
        ClassifierEntry(
            name="ppocr-cls",
            summary="PaddleOCR text-direction classifier ch_ppocr_mobile_v2.0_cls, 0 or 180 "
                    "degrees (Apache-2.0), RapidOCR 3.10.0",
            # Input x float32 [N, 3, 48, 192]: the crop resized to height 48 keeping its
            # ratio (width at most 192), (x/255 - 0.5)/0.5 on BGR pixels, zero-padded on the
            # right (PaddleOCR tools/infer/predict_cls.py); output softmax [N, 2] over the
            # labels "0" and "180".
            spec=ClassifierSpec(arch="ppocr-cls", labels=("0", "180"),
                                output_name="save_infer_model/scale_0.tmp_1"),
            weights=WeightSource(
                package="rapidocr",
                version="3.10.0",
                member="rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
                sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                license="Apache-2.0",
                filename="ppocr_cls.onnx",
            ),
        ),
    )
}


def detector_entry(name: str) -> DetectorEntry:
    """The detector registry entry ``name``.

    Raises:
        ToolchainError: unknown name; the message lists the known ones.
    """
    try:
        return DETECTORS[name]
    except KeyError:
        raise ToolchainError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}") from None


def arch_entry(name: str) -> ArchEntry:
    """The registry entry ``name``.

    Raises:
        ToolchainError: unknown name; the message lists the known ones.
    """
    try:
        return ARCHS[name]
    except KeyError:
        raise ToolchainError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def spec_for_arch(name: str) -> ModelSpec:
    """The default description of architecture ``name``.

    Raises:
        ToolchainError: unknown name, or a model whose charset ships with its weights (then
            the description comes from the fetched file).
    """
    entry = arch_entry(name)
    if not entry.spec.alphabet:
        raise ToolchainError(
            f"{name}'s charset ships with its weights: run `python -m "
            f"models.weights fetch {name}` and use the file it prints"
        )
    return entry.spec


def build_model(spec: ModelSpec, rnn_layout: str | None = None):
    """An untrained PyTorch model for ``spec`` in eval mode (imports torch).

    Args:
        spec: the description; its ``arch`` picks the entry.
        rnn_layout: one of the entry's ``rnn_layouts`` (default: the first).

    Raises:
        ToolchainError: the architecture has no PyTorch definition, or the layout is unknown.
    """
    entry = arch_entry(spec.arch)
    if entry.build is None:
        raise ToolchainError(f"{spec.arch} has no PyTorch definition here (it ships as ONNX: "
                             f"python -m models.weights fetch {spec.arch})")
    layout = rnn_layout or entry.rnn_layouts[0]
    if layout not in entry.rnn_layouts:
        raise ToolchainError(
            f"{spec.arch} has no recurrent layout {layout!r}; its layouts: "
            f"{', '.join(entry.rnn_layouts)}"
        )
    return entry.build(spec, layout)
