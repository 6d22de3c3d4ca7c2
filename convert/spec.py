"""Model descriptions: what every later step needs to know about a CRNN, in one place.

A :class:`ModelSpec` travels with the model: ``convert.pth2onnx`` writes it into the ONNX
``metadata_props`` and ``convert.atc`` into the sidecar JSON beside the .om, so that
preprocessing, inference and decoding need no repeated flags. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from convert.errors import ToolchainError

#: Prefix of every key this project writes into ONNX ``metadata_props``.
METADATA_PREFIX = "crnn."
#: ``metadata_props`` key that marks an int8 model written by ``infer.quantize`` (JSON settings).
QUANTIZATION_METADATA_KEY = "crnn_toolchain.quantization"


def quantization_of(model) -> dict | None:
    """The settings ``infer.quantize`` recorded in a loaded ``onnx.ModelProto``; None for fp32."""
    value = next((p.value for p in model.metadata_props if p.key == QUANTIZATION_METADATA_KEY), None)
    return None if value is None else json.loads(value)

WIDTH_POLICIES = ("fixed", "keep-ratio")
RESAMPLE_FILTERS = ("bilinear", "bicubic", "nearest", "lanczos")


@dataclass(frozen=True)
class ModelSpec:
    """Everything downstream of the export needs to know about one CRNN.

    Attributes:
        arch: architecture name, a key of :data:`ARCHS`.
        alphabet: the characters of classes ``1..len(alphabet)``; class ``blank`` is the
            CTC blank, so ``num_classes == len(alphabet) + 1``.
        blank: index of the CTC blank class in the logits' last axis.
        height: input height in pixels (the network collapses it to 1).
        channels: input channels (1: grey).
        mean, std: normalisation ``(x / 255 - mean) / std`` applied to 8-bit grey pixels.
        resample: Pillow resampling filter used to resize to ``height``.
        width_policy: ``"fixed"`` resizes every image to ``width``; ``"keep-ratio"`` resizes
            to ``round(w * height / h)`` clamped to ``[min_width, max_width]``.
        width: training width (used by the ``fixed`` policy).
        min_width, max_width: clamp of the ``keep-ratio`` policy, in pixels.
        width_step: ``keep-ratio`` widths are rounded to a multiple of this many pixels
            (1: no rounding); fewer distinct widths make fuller equal-width batches.
        output_kind: what the exported ``output1`` holds: ``"logits"`` (pre-softmax).
    """

    arch: str
    alphabet: str
    blank: int = 0
    height: int = 32
    channels: int = 1
    mean: float = 0.5
    std: float = 0.5
    resample: str = "bilinear"
    width_policy: str = "fixed"
    width: int = 100
    min_width: int = 32
    max_width: int = 320
    width_step: int = 1
    output_kind: str = "logits"

    #: Smallest input width the convolution/pooling stack accepts (two 2x2/2 pools).
    MIN_INPUT_WIDTH = 4

    @property
    def num_classes(self) -> int:
        """Size of the logits' class axis: the alphabet plus the blank."""
        return len(self.alphabet) + 1

    def frames(self, width: int) -> int:
        """Number of CTC frames T the network produces for an input ``width`` in pixels.

        Two 2x2/2 pools give ``w // 4``; two (2,2)/(2,1) pools with padding (0,1) add one
        column each; the final 2x2 convolution without padding removes one: ``w // 4 + 1``.
        """
        return width // 4 + 1

    def resized_width(self, width: int, height: int) -> int:
        """Input width in pixels for an image of ``width`` x ``height`` under the width policy.

        ``fixed``: :attr:`width`. ``keep-ratio``: ``w * height_model / h`` rounded half up to a
        multiple of :attr:`width_step`, then clamped to ``[min_width, max_width]``.
        """
        if self.width_policy == "fixed":
            return self.width
        step = self.width_step
        scaled = width * self.height / height
        rounded = int(math.floor(scaled / step + 0.5)) * step
        return min(max(rounded, self.min_width), self.max_width)

    def validate(self) -> None:
        """Raise :class:`ToolchainError` when the description is inconsistent."""
        if self.width_policy not in WIDTH_POLICIES:
            raise ToolchainError(
                f"width policy {self.width_policy!r} is unknown; use one of {WIDTH_POLICIES}"
            )
        if self.resample not in RESAMPLE_FILTERS:
            raise ToolchainError(
                f"resampling filter {self.resample!r} is unknown; use one of {RESAMPLE_FILTERS}"
            )
        if not self.MIN_INPUT_WIDTH <= self.min_width <= self.max_width:
            raise ToolchainError(
                f"width range [{self.min_width}, {self.max_width}] is invalid: need "
                f"{self.MIN_INPUT_WIDTH} <= min_width <= max_width"
            )
        if self.width_step < 1:
            raise ToolchainError(f"width step {self.width_step} must be >= 1")
        if self.width < self.MIN_INPUT_WIDTH:
            raise ToolchainError(
                f"width {self.width} is below the network's minimum of {self.MIN_INPUT_WIDTH}"
            )
        if not 0 <= self.blank < self.num_classes:
            raise ToolchainError(f"blank index {self.blank} is outside 0..{self.num_classes - 1}")

    def replace(self, **changes) -> ModelSpec:
        """A copy with ``changes`` applied and validated."""
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "model description") -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones default.

        Raises:
            ToolchainError: ``arch`` or ``alphabet`` is missing, or a value is invalid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"arch", "alphabet"} - data.keys()
        if missing:
            raise ToolchainError(f"{source} lacks {sorted(missing)}")
        spec = cls(**{k: v for k, v in data.items() if k in names})
        spec.validate()
        return spec

    def to_metadata(self) -> dict[str, str]:
        """Key/value strings for ONNX ``metadata_props`` (values JSON-encoded)."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> ModelSpec:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ToolchainError: ``props`` holds no description (a model not exported by
                ``convert.pth2onnx``): pass ``--arch`` instead.
        """
        data = {
            k[len(METADATA_PREFIX):]: json.loads(v)
            for k, v in props.items()
            if k.startswith(METADATA_PREFIX)
        }
        if not data:
            raise ToolchainError(
                f"{source} carries no model description in its metadata (not exported by "
                "convert.pth2onnx?); pass --arch to say which model it is"
            )
        return cls.from_dict(data, source)

    @classmethod
    def from_onnx(cls, model, source: str) -> ModelSpec:
        """The description in a loaded ``onnx.ModelProto``'s metadata (see :meth:`from_metadata`)."""
        return cls.from_metadata({p.key: p.value for p in model.metadata_props}, source)


#: The architectures this toolchain knows, by name.
ARCHS: dict[str, ModelSpec] = {
    # meijieru crnn.pytorch / Ascend ModelZoo CRNN: lower-case alphanumerics, trained at 32x100.
    "crnn": ModelSpec(
        arch="crnn",
        alphabet="0123456789abcdefghijklmnopqrstuvwxyz",
        width_policy="fixed",
        width=100,
        min_width=32,
        max_width=320,
    ),
    # nano-ocr 0.1.0: 65 characters, trained at fixed 32x128 with bilinear resizing. The
    # default policy, keep-ratio clamped to [96, 192], was chosen by measurement on IIIT5K
    # (`python -m bench.width_policy`): 0.7927 against 0.7760 for fixed 128, with 0.87x
    # the engine time; see the README's table.
    "nano-ocr": ModelSpec(
        arch="nano-ocr",
        alphabet="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.- ",
        width_policy="keep-ratio",
        width=128,
        min_width=96,
        max_width=192,
    ),
}


def spec_for_arch(arch: str) -> ModelSpec:
    """The built-in description of ``arch``.

    Raises:
        ToolchainError: ``arch`` is unknown; the message lists the known ones.
    """
    try:
        return ARCHS[arch]
    except KeyError:
        raise ToolchainError(
            f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}"
        ) from None


def read_onnx_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` stored in an ONNX model's ``metadata_props``.

    Raises:
        ToolchainError: the file is missing, not ONNX, or carries no description.
    """
    from convert.onnx_io import load_onnx  # local: keeps `import convert.spec` light

    return ModelSpec.from_onnx(load_onnx(path, load_external_data=False), str(path))
