"""Image-classifier descriptions: what the toolchain needs to run one image classifier.

A :class:`ClassifierSpec` travels with the classifier as ``models.spec.ModelSpec`` does with
a recogniser: ``models.weights`` writes it into the ONNX ``metadata_props`` (keys prefixed
:data:`CLS_METADATA_PREFIX`) and ``convert.atc`` into the .om's sidecar. It names the
tensors, the input's size, colour order and normalisation, how an image is resized to the
input, whether the output holds logits or probabilities, and the labels in class order.

Two resize rules:
    ``"pad"``: PaddleOCR's text-direction classifier (``tools/infer/predict_cls.py``,
    ``resize_norm_img``): the image is resized to ``height`` keeping its aspect ratio, its
    width capped at ``width`` (``ceil(height * w / h)``), normalised, and padded on the
    right with zeros up to ``width``.
    ``"stretch"``: resized to ``width`` x ``height`` whatever its aspect ratio (the usual
    ImageNet-style classifier at a fixed input size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from common.errors import ToolchainError
from models.spec import CHANNEL_ORDERS, OUTPUT_KINDS, Description

#: Prefix of the classifier description's keys in ONNX ``metadata_props``.
CLS_METADATA_PREFIX = "crnn_cls."
#: The ``task`` value that marks a classifier description.
CLASSIFICATION_TASK = "image-classification"
RESIZE_RULES = ("pad", "stretch")
#: ImageNet's per-channel mean and std in RGB order (torchvision's models), the default
#: normalisation of a classifier that carries no description.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassifierSpec(Description):
    """Everything needed to run one image classifier.

    Attributes:
        arch: registry name (``models.registry.CLASSIFIERS``), or a free name for a
            classifier from elsewhere.
        task: always :data:`CLASSIFICATION_TASK`.
        labels: one name per class, in the order of the output's class axis.
        input_name, output_name: the engine's tensors: input float32 ``[N, C, height,
            width]``, output float32 ``[N, len(labels)]``.
        height, width: the input size in pixels.
        channel_order: ``"grey"``, ``"rgb"`` or ``"bgr"`` (:data:`models.spec.CHANNEL_ORDERS`).
        mean, std: normalisation ``(x / 255 - mean) / std`` per channel, in that order.
        resize: ``"pad"`` or ``"stretch"`` (module docstring).
        output_kind: ``"probabilities"`` (a softmax is in the graph) or ``"logits"``.
    """

    arch: str
    labels: tuple[str, ...]
    task: str = CLASSIFICATION_TASK
    input_name: str = "x"
    output_name: str = "output"
    height: int = 48
    width: int = 192
    channel_order: str = "bgr"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resize: str = "pad"
    output_kind: str = "probabilities"

    metadata_prefix: ClassVar[str] = CLS_METADATA_PREFIX
    #: The input's batch axis, and the output's.
    batch_axis: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for name in ("mean", "std", "labels"):  # JSON gives lists; keep the value hashable
            value = getattr(self, name)
            if isinstance(value, list):
                cast = str if name == "labels" else float
                object.__setattr__(self, name, tuple(cast(v) for v in value))

    @property
    def channels(self) -> int:
        """Input channels (:data:`models.spec.CHANNEL_ORDERS`)."""
        return CHANNEL_ORDERS[self.channel_order]

    @property
    def num_classes(self) -> int:
        """Size of the output's class axis."""
        return len(self.labels)

    @property
    def min_input_width(self) -> int:
        """The input width: a classifier's input has one size."""
        return self.width

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        """``(batch, channels, height, width)`` of an input batch."""
        return (batch, self.channels, self.height, self.width)

    def resized_width(self, width: int, height: int) -> int:
        """Width in pixels an image of ``width`` x ``height`` is resized to before padding:
        ``min(self.width, ceil(self.height * width / height))`` for ``"pad"``, else
        :attr:`width`.

        Raises:
            ToolchainError: a side of 0 pixels.
        """
        if width < 1 or height < 1:
            raise ToolchainError(f"image of {width}x{height} pixels has no area")
        if self.resize == "stretch":
            return self.width
        return max(1, min(self.width, math.ceil(self.height * width / height)))

    def output_shape_of(self, input_shape: tuple[int, ...]) -> tuple[int, int]:
        """The output's shape ``(N, classes)`` for an input of ``input_shape`` ``(N, C, H, W)``."""
        return (input_shape[0], self.num_classes)

    def trim_output(self, output, rows: int, input_shape: tuple[int, ...]):
        """The first ``rows`` rows of an output computed on a larger padded batch."""
        return output[:rows]

    def validate(self) -> None:
        """Raise :class:`ToolchainError` when the description is inconsistent."""
        if self.task != CLASSIFICATION_TASK:
            raise ToolchainError(f"task {self.task!r} is not {CLASSIFICATION_TASK!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ToolchainError(f"channel order {self.channel_order!r}: use one of "
                                 f"{tuple(CHANNEL_ORDERS)}")
        if self.resize not in RESIZE_RULES:
            raise ToolchainError(f"resize {self.resize!r}: use one of {RESIZE_RULES}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ToolchainError(f"output kind {self.output_kind!r}: use one of {OUTPUT_KINDS}")
        if len(self.labels) < 2:
            raise ToolchainError(f"a classifier needs at least 2 labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ToolchainError("the labels repeat a name")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ToolchainError(f"{name} needs one value per channel ({self.channels})")
        if min(self.std) <= 0:
            raise ToolchainError("std values must be > 0")
        if self.height < 1 or self.width < 1:
            raise ToolchainError(f"input size {self.width}x{self.height} has no area")

    @classmethod
    def from_dict(cls, data: dict, source: str = "classifier description") -> ClassifierSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones default.

        Raises:
            ToolchainError: not a classifier description, or an invalid value (names
                ``source``).
        """
        if (not isinstance(data, dict) or data.get("task") != CLASSIFICATION_TASK
                or "arch" not in data or "labels" not in data):
            raise ToolchainError(f"{source}: not a classifier description")
        return cls._from_fields(data, source)


def classifier_spec_from_metadata(props: dict[str, str], source: str) -> ClassifierSpec | None:
    """The classifier description in ONNX ``metadata_props``; None when there is none."""
    data = ClassifierSpec.metadata_fields(props)
    return ClassifierSpec.from_dict(data, source) if data else None


def read_labels(path, expected: int | None = None) -> tuple[str, ...]:
    """The labels of a label file: one per line, in class order (blank lines at the end
    ignored; a line's surrounding whitespace is kept out).

    Args:
        path: the file (UTF-8).
        expected: the classifier's class count, when known.

    Raises:
        ToolchainError: unreadable, empty, a blank line among the labels, a repeated
            label, or not ``expected`` labels (each names the file).
    """
    from pathlib import Path

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"{path}: unreadable label file ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if not labels:
        raise ToolchainError(f"{path}: no labels (one per line, in class order)")
    if "" in labels:
        raise ToolchainError(f"{path}:{labels.index('') + 1}: blank label")
    if len(set(labels)) != len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise ToolchainError(f"{path}: label {repeated!r} appears twice")
    if expected is not None and len(labels) != expected:
        raise ToolchainError(f"{path}: {len(labels)} labels for a classifier of {expected} "
                             "classes")
    return tuple(labels)
