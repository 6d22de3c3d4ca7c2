"""Detector descriptions: what the pipeline needs to know about a DB text detector.

A :class:`DetectorSpec` travels with the detector as :class:`models.spec.ModelSpec` does
with a recogniser: ``models.weights`` writes it into the ONNX ``metadata_props`` (keys
prefixed :data:`DET_METADATA_PREFIX`) and ``convert.atc`` into the .om's sidecar. It names
the tensors, the input's colour order and normalisation, the resize rule (which side is
limited, to how many pixels, and the stride both sides are rounded to) and the DB
post-processing settings (Liao et al., "Real-time Scene Text Detection with Differentiable
Binarization", AAAI 2020; the parameter names of PaddleOCR ``DBPostProcess``).
:func:`description_from_dict` reads either kind of description back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from common.errors import ToolchainError
from models.cls_spec import CLASSIFICATION_TASK, ClassifierSpec
from models.spec import CHANNEL_ORDERS, Description, ModelSpec

#: Prefix of the detector description's keys in ONNX ``metadata_props``.
DET_METADATA_PREFIX = "crnn_det."
#: The ``task`` value that marks a detector description.
DETECTION_TASK = "text-detection"
#: ``"max"``: the longer side is scaled down to at most ``limit_side_len`` (PaddleOCR);
#: ``"min"``: the shorter side is scaled up to at least ``limit_side_len`` (RapidOCR).
LIMIT_TYPES = ("max", "min")
SCORE_MODES = ("fast", "slow")


@dataclass(frozen=True)
class DetectorSpec(Description):
    """Everything the pipeline needs to run one DB text detector.

    Attributes:
        arch: registry name (``models.registry.DETECTORS``).
        task: always :data:`DETECTION_TASK` (tells the two kinds of description apart).
        input_name, output_name: the engine's tensors: input float32 ``[N, 3, H, W]``,
            output the text probability map float32 ``[N, 1, H, W]``.
        channel_order: ``"rgb"`` or ``"bgr"`` order of the input's channels.
        mean, std: normalisation ``(x / 255 - mean) / std`` per channel, in that order.
        limit_type, limit_side_len: the resize rule (:data:`LIMIT_TYPES`), in pixels.
        stride: both input sides are rounded to a multiple of this, in pixels.
        min_side, max_side: the input sides the engine is asked to take (ATC shape range),
            in pixels; the resized sides are clamped into them.
        thresh: probability threshold of the binary map.
        box_thresh: minimum mean probability inside a box (its score).
        unclip_ratio: the box is grown by ``area * ratio / perimeter`` pixels on every side.
        max_candidates: contours examined per image at most.
        min_box_side: boxes whose shorter side is under this many pixels are dropped
            (before and after unclipping), in map pixels.
        use_dilation: dilate the binary map with a 2x2 kernel first.
        score_mode: ``"fast"`` (mean inside the box's bounding rectangle's polygon mask)
            or ``"slow"`` (inside the contour).
    """

    arch: str
    task: str = DETECTION_TASK
    input_name: str = "x"
    output_name: str = "sigmoid_0.tmp_0"
    channel_order: str = "bgr"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    limit_type: str = "max"
    limit_side_len: int = 960
    stride: int = 32
    min_side: int = 32
    max_side: int = 4000
    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    max_candidates: int = 1000
    min_box_side: float = 3.0
    use_dilation: bool = False
    score_mode: str = "fast"

    metadata_prefix: ClassVar[str] = DET_METADATA_PREFIX

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    channels: ClassVar[int] = 3
    #: The input's batch axis, and that of the probability map.
    batch_axis: ClassVar[int] = 0

    @property
    def min_input_width(self) -> int:
        """Narrowest input the detector is given: one stride (``input_size`` never gives less)."""
        return self.stride

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the engine input for an image of ``width`` x ``height``.

        The scale makes the limited side ``limit_side_len`` (``"max"``: only ever shrinks;
        ``"min"``: only ever grows); each side is then rounded to a multiple of ``stride``
        (at least one stride) and clamped to ``[min_side, max_side]``.

        Raises:
            ToolchainError: a side of 0 pixels.
        """
        if width < 1 or height < 1:
            raise ToolchainError(f"image of {width}x{height} pixels has no area")
        if self.limit_type == "max":
            scale = min(1.0, self.limit_side_len / max(width, height))
        else:
            scale = max(1.0, self.limit_side_len / min(width, height))

        def side(pixels: int) -> int:
            rounded = max(self.stride, int(math.floor(pixels * scale / self.stride + 0.5))
                          * self.stride)
            return min(max(rounded, self.min_side), self.max_side)

        return side(width), side(height)

    def output_shape_of(self, input_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The probability map's shape for an input of ``input_shape`` ``(N, 3, H, W)``."""
        return (input_shape[0], 1, input_shape[2], input_shape[3])

    def trim_output(self, output, rows: int, input_shape: tuple[int, ...]):
        """The maps of ``rows`` inputs of ``input_shape`` inside an output computed on a
        larger padded batch (padding on the bottom and right, as ais_bench gears pad)."""
        return output[:rows, :, : input_shape[2], : input_shape[3]]

    def validate(self) -> None:
        """Raise :class:`ToolchainError` when the description is inconsistent."""
        if self.task != DETECTION_TASK:
            raise ToolchainError(f"task {self.task!r} is not {DETECTION_TASK!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ToolchainError(f"channel order {self.channel_order!r}: use 'rgb' or 'bgr'")
        if self.limit_type not in LIMIT_TYPES:
            raise ToolchainError(f"limit type {self.limit_type!r}: use one of {LIMIT_TYPES}")
        if self.score_mode not in SCORE_MODES:
            raise ToolchainError(f"score mode {self.score_mode!r}: use one of {SCORE_MODES}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != CHANNEL_ORDERS[self.channel_order]:
                raise ToolchainError(f"{name} needs one value per channel (3)")
        if min(self.std) <= 0:
            raise ToolchainError("std values must be > 0")
        if not (self.stride >= 1 and self.stride <= self.min_side <= self.max_side
                and self.min_side % self.stride == 0 and self.max_side >= self.limit_side_len):
            raise ToolchainError(
                f"sides: need stride ({self.stride}) <= min_side ({self.min_side}) <= "
                f"max_side ({self.max_side}), min_side a multiple of the stride, and "
                f"max_side >= limit_side_len ({self.limit_side_len})")
        if not (0 < self.thresh < 1 and 0 <= self.box_thresh < 1 and self.unclip_ratio > 0
                and self.max_candidates >= 1 and self.min_box_side >= 0):
            raise ToolchainError("DB settings: need 0 < thresh < 1, 0 <= box_thresh < 1, "
                                 "unclip_ratio > 0, max_candidates >= 1, min_box_side >= 0")

    @classmethod
    def from_dict(cls, data: dict, source: str = "detector description") -> DetectorSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones default.

        Raises:
            ToolchainError: not a detector description, or an invalid value (names ``source``).
        """
        if not isinstance(data, dict) or data.get("task") != DETECTION_TASK or "arch" not in data:
            raise ToolchainError(f"{source}: not a detector description")
        return cls._from_fields(data, source)


def description_from_dict(data: dict, source: str) -> Description:
    """A recogniser's :class:`ModelSpec`, a :class:`DetectorSpec` or a
    ``models.cls_spec.ClassifierSpec``, by its ``task`` key (none: a recogniser)."""
    kinds = {DETECTION_TASK: DetectorSpec, CLASSIFICATION_TASK: ClassifierSpec}
    kind = kinds.get(data.get("task")) if isinstance(data, dict) else None
    return (kind or ModelSpec).from_dict(data, source)


def detector_spec_from_metadata(props: dict[str, str], source: str) -> DetectorSpec | None:
    """The detector description in ONNX ``metadata_props``; None when there is none."""
    data = DetectorSpec.metadata_fields(props)
    return DetectorSpec.from_dict(data, source) if data else None
