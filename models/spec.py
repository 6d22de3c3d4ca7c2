"""Model descriptions: what every later step needs to know about a CTC recogniser, in one place.

A :class:`ModelSpec` travels with the model: ``convert.pth2onnx`` and ``models.weights``
write it into the ONNX ``metadata_props`` and ``convert.atc`` into the sidecar JSON beside the
.om, so that preprocessing, inference and decoding need no repeated flags. It names the
input and output tensors, the input's channels, colour order, height and normalisation, the
width policy, the output layout (``[T, N, C]`` or ``[N, T, C]``), whether the output holds
logits or probabilities, and the frames rule ``T = W // downsample + frame_offset``. The
architectures themselves are registered in :mod:`models.registry`. This module imports no
torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from common.errors import ToolchainError
from models.charset import Charset

#: Prefix of every key this project writes into ONNX ``metadata_props``.
METADATA_PREFIX = "crnn."
#: ``metadata_props`` key that marks an int8 model written by ``convert.quantize`` (JSON settings).
QUANTIZATION_METADATA_KEY = "crnn_toolchain.quantization"

WIDTH_POLICIES = ("fixed", "keep-ratio")
RESAMPLE_FILTERS = ("bilinear", "bicubic", "nearest", "lanczos")
#: Colour order of the input's channel axis: one grey channel, or three in RGB or BGR order.
CHANNEL_ORDERS = {"grey": 1, "rgb": 3, "bgr": 3}
#: ``"TNC"``: ``[frames, batch, classes]`` (crnn.pytorch); ``"NTC"``: ``[batch, frames, classes]``.
OUTPUT_LAYOUTS = ("TNC", "NTC")
#: ``"logits"``: pre-softmax scores; ``"probabilities"``: a softmax already applied.
OUTPUT_KINDS = ("logits", "probabilities")
#: How a tall crop is read: ``"keep"`` as it is; ``"turn"`` as it is and turned 90 degrees
#: both ways, keeping the most confident reading (:meth:`ModelSpec.reading_turns`).
TALL_CROPS = ("keep", "turn")
#: Quarter turns of a crop's readings: 0 none, 1 counter-clockwise (``numpy.rot90``'s
#: sense, Pillow's ``ROTATE_90``), -1 clockwise; the upright reading first.
TURNS = (0, 1, -1)


def quantization_of(model) -> dict | None:
    """The settings ``convert.quantize`` recorded in a loaded ``onnx.ModelProto``; None for fp32."""
    value = next(
        (p.value for p in model.metadata_props if p.key == QUANTIZATION_METADATA_KEY), None
    )
    return None if value is None else json.loads(value)


def batch_dependent(model) -> bool:
    """Whether a loaded ``onnx.ModelProto`` gives a sample a result that depends on the rest
    of its batch: ``convert.quantize --lstm int8`` (``DynamicQuantizeLSTM``) takes the LSTM's
    activation scales from each call's inputs."""
    settings = quantization_of(model) or {}
    return str(settings.get("lstm", "fp32")).startswith("int8")


class Description:
    """What every model description shares (:class:`ModelSpec` here, and
    ``models.det_spec.DetectorSpec``): validated copies, plain dicts, and the ONNX
    ``metadata_props`` form, whose keys carry the class's :attr:`metadata_prefix`."""

    metadata_prefix: ClassVar[str]

    def validate(self) -> None:
        raise NotImplementedError

    def replace(self, **changes):
        """A copy with ``changes`` applied and validated."""
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    def to_metadata(self) -> dict[str, str]:
        """Key/value strings for ONNX ``metadata_props`` (values JSON-encoded)."""
        return {self.metadata_prefix + k: json.dumps(v, ensure_ascii=False)
                for k, v in self.to_dict().items()}

    @classmethod
    def metadata_fields(cls, props: dict[str, str]) -> dict[str, object]:
        """The fields this class's keys hold in ``metadata_props`` (empty: none)."""
        prefix = cls.metadata_prefix
        return {k[len(prefix):]: json.loads(v) for k, v in props.items() if k.startswith(prefix)}

    @classmethod
    def _from_fields(cls, data: dict, source: str):
        """An instance of the known keys of ``data``, validated; errors name ``source``."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            spec = cls(**{k: v for k, v in data.items() if k in names})
            spec.validate()
        except (ToolchainError, TypeError) as exc:
            raise ToolchainError(f"{source}: {exc}") from None
        return spec


@dataclass(frozen=True)
class ModelSpec(Description):
    """Everything downstream of the export needs to know about one CTC recogniser.

    Defaults are the CRNN's (crnn.pytorch, the Ascend ModelZoo, nano-ocr), so descriptions
    written before a field existed read back unchanged.

    Attributes:
        arch: architecture name, a key of :data:`models.registry.ARCHS`.
        alphabet: the characters of the non-blank classes, in class order (see
            :class:`models.charset.Charset`); ``num_classes == len(alphabet) + 1``.
        blank: index of the CTC blank class in the output's class axis.
        input_name, output_name: the engine's tensor names.
        height: input height in pixels.
        channels: input channels, ``CHANNEL_ORDERS[channel_order]``.
        channel_order: ``"grey"``, ``"rgb"`` or ``"bgr"``.
        mean, std: normalisation ``(x / 255 - mean) / std`` of 8-bit pixels; a float, or
            one value per channel.
        resample: Pillow resampling filter used to resize to ``height``.
        width_policy: ``"fixed"`` resizes every image to ``width``; ``"keep-ratio"`` to
            ``round(w * height / h)`` clamped to ``[min_width, max_width]``.
        width: training width (used by the ``fixed`` policy).
        min_width, max_width: clamp of the ``keep-ratio`` policy, in pixels.
        width_step: ``keep-ratio`` widths are rounded to a multiple of this (1: none).
        output_layout: ``"TNC"`` or ``"NTC"`` (:data:`OUTPUT_LAYOUTS`).
        output_kind: ``"logits"`` or ``"probabilities"`` (:data:`OUTPUT_KINDS`).
        downsample, frame_offset: the frames rule ``T = width // downsample + frame_offset``.
        min_input_width: narrowest input width the network accepts, in pixels.
        width_gears: the widths an .om was compiled for (``convert.atc`` gears mode), ascending;
            when set, every width the policy gives is snapped to the nearest gear, so inputs
            match the compiled widths exactly and nothing is padded. Empty: any width.
        tall_crops: ``"keep"`` reads every crop as it is; ``"turn"`` also reads a crop at
            least ``tall_ratio`` times as high as wide turned 90 degrees both ways and keeps
            the reading with the highest confidence (words written downwards or upwards in
            scene photos; PaddleOCR turns such crops one way at the same ratio,
            ``tools/infer/predict_system.py``, ``get_rotate_crop_image``).
        tall_ratio: height / width at or above which ``"turn"`` reads a crop three ways.
    """

    arch: str
    alphabet: str
    blank: int = 0
    input_name: str = "imgs"
    output_name: str = "output1"
    height: int = 32
    channels: int = 1
    channel_order: str = "grey"
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.5
    resample: str = "bilinear"
    width_policy: str = "fixed"
    width: int = 100
    min_width: int = 32
    max_width: int = 320
    width_step: int = 1
    output_layout: str = "TNC"
    output_kind: str = "logits"
    downsample: int = 4
    frame_offset: int = 1
    min_input_width: int = 4
    width_gears: tuple[int, ...] = ()
    tall_crops: str = "keep"
    tall_ratio: float = 1.5

    metadata_prefix: ClassVar[str] = METADATA_PREFIX

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # JSON gives lists; keep the frozen value hashable
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if isinstance(self.width_gears, list):
            object.__setattr__(self, "width_gears", tuple(int(g) for g in self.width_gears))

    @property
    def num_classes(self) -> int:
        """Size of the output's class axis: the alphabet plus the blank."""
        return len(self.alphabet) + 1

    @cached_property
    def charset(self) -> Charset:
        """The :class:`Charset` of :attr:`alphabet` and :attr:`blank`."""
        return Charset(self.alphabet, self.blank)

    @property
    def time_major(self) -> bool:
        """Whether the output is ``[T, N, C]``."""
        return self.output_layout == "TNC"

    @property
    def batch_axis(self) -> int:
        """The output's batch axis (1 for ``[T, N, C]``, 0 for ``[N, T, C]``)."""
        return 1 if self.time_major else 0

    def trim_output(self, output, rows: int, input_shape: tuple[int, ...]):
        """The output of ``rows`` inputs of ``input_shape`` inside an output computed on a
        larger padded batch (wider inputs, more rows): the first ``frames(width)`` frames of
        the first ``rows`` rows."""
        frames = self.frames(input_shape[3])
        return output[:frames, :rows] if self.time_major else output[:rows, :frames]

    def policy_widths(self) -> list[int]:
        """The extreme input widths preprocessing can produce: the gears, else the fixed
        width, else ``[min_width, max_width]`` (what an engine's width range must cover)."""
        if self.width_gears:
            return list(self.width_gears)
        return [self.width] if self.width_policy == "fixed" else [self.min_width, self.max_width]

    def frames(self, width: int) -> int:
        """CTC frames T for an input ``width`` in pixels: ``width // downsample + frame_offset``.

        crnn and nano-ocr: two 2x2/2 pools give ``w // 4``, two (2,2)/(2,1) pools with
        padding (0,1) add one column each, the final 2x2 convolution removes one:
        ``w // 4 + 1``. PP-OCRv4 (SVTR-LCNet): ``w // 8``.
        """
        return width // self.downsample + self.frame_offset

    def frame_centre_x(self, frame: int, width: int) -> float:
        """x of frame ``frame``'s centre in an input ``width`` pixels wide, in pixels.

        The frames tile the input evenly: frame t covers ``[t, t + 1) * width / T``.
        """
        return (frame + 0.5) * width / self.frames(width)

    def input_shape(self, batch: int, width: int) -> tuple[int, int, int, int]:
        """``(batch, channels, height, width)`` of an input batch."""
        return (batch, self.channels, self.height, width)

    def output_shape(self, batch: int, width: int) -> tuple[int, int, int]:
        """Shape of the output for an input ``batch`` x ``width``, in :attr:`output_layout`."""
        frames = self.frames(width)
        if self.time_major:
            return (frames, batch, self.num_classes)
        return (batch, frames, self.num_classes)

    def output_shape_of(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """:meth:`output_shape` for an input of shape ``(N, C, H, W)`` (the form every
        description answers, ``models.det_spec.DetectorSpec`` too)."""
        return self.output_shape(input_shape[0], input_shape[3])

    def resized_width(self, width: int, height: int) -> int:
        """Input width in pixels for an image of ``width`` x ``height`` under the width policy.

        ``fixed``: :attr:`width`. ``keep-ratio``: ``w * height_model / h`` rounded half up to a
        multiple of :attr:`width_step`, then clamped to ``[min_width, max_width]``. With
        :attr:`width_gears`, the result is then snapped to the nearest gear (ties go up).
        """
        if self.width_policy == "fixed":
            chosen = self.width
        else:
            step = self.width_step
            scaled = width * self.height / height
            rounded = int(math.floor(scaled / step + 0.5)) * step
            chosen = min(max(rounded, self.min_width), self.max_width)
        if self.width_gears:
            return min(self.width_gears, key=lambda gear: (abs(gear - chosen), -gear))
        return chosen

    def reading_turns(self, width: int, height: int) -> tuple[int, ...]:
        """The quarter turns (:data:`TURNS`) an image of ``width`` x ``height`` pixels is
        read in: all three for a tall crop under ``tall_crops="turn"``, else ``(0,)``."""
        if self.tall_crops == "turn" and height >= self.tall_ratio * width:
            return TURNS
        return (0,)

    def validate(self) -> None:
        """Raise :class:`ToolchainError` when the description is inconsistent."""

        def choice(name: str, allowed) -> None:
            if getattr(self, name) not in allowed:
                raise ToolchainError(
                    f"{name} {getattr(self, name)!r} is unknown; use one of {tuple(allowed)}"
                )

        choice("width_policy", WIDTH_POLICIES)
        choice("resample", RESAMPLE_FILTERS)
        choice("channel_order", CHANNEL_ORDERS)
        choice("output_layout", OUTPUT_LAYOUTS)
        choice("output_kind", OUTPUT_KINDS)
        choice("tall_crops", TALL_CROPS)
        if not (isinstance(self.tall_ratio, (int, float)) and self.tall_ratio >= 1.0):
            raise ToolchainError(f"tall ratio {self.tall_ratio!r} must be a number >= 1")
        if self.channels != CHANNEL_ORDERS[self.channel_order]:
            raise ToolchainError(
                f"channel order {self.channel_order!r} has "
                f"{CHANNEL_ORDERS[self.channel_order]} channels, not {self.channels}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.channels:
                raise ToolchainError(f"{name} has {len(value)} values for {self.channels} channels")
        if self.downsample < 1 or self.min_input_width < 1 or self.height < 1:
            raise ToolchainError("downsample, min_input_width and height must be >= 1")
        if self.frames(self.min_input_width) < 1:
            raise ToolchainError(
                f"the frames rule gives no frame at the minimum input width {self.min_input_width}"
            )
        if not self.min_input_width <= self.min_width <= self.max_width:
            raise ToolchainError(
                f"width range [{self.min_width}, {self.max_width}] is invalid: need "
                f"{self.min_input_width} <= min_width <= max_width"
            )
        if list(self.width_gears) != sorted(set(self.width_gears)) or any(
                g < self.min_input_width for g in self.width_gears):
            raise ToolchainError(f"width gears {list(self.width_gears)} must be ascending, "
                                 f"distinct and >= {self.min_input_width}")
        if self.width_step < 1:
            raise ToolchainError(f"width step {self.width_step} must be >= 1")
        if self.width < self.min_input_width:
            raise ToolchainError(
                f"width {self.width} is below the network's minimum of {self.min_input_width}"
            )
        Charset(self.alphabet, self.blank)  # repeats and the blank's range

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "model description") -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones default.

        Raises:
            ToolchainError: ``arch`` or ``alphabet`` is missing, or a value is invalid
                (the message names ``source``).
        """
        if not isinstance(data, dict):
            raise ToolchainError(f"{source}: the model description is not a JSON object")
        missing = {"arch", "alphabet"} - data.keys()
        if missing:
            raise ToolchainError(f"{source} lacks {sorted(missing)}")
        return cls._from_fields(data, source)

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> ModelSpec:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ToolchainError: ``props`` holds no description (a model neither exported by
                ``convert.pth2onnx`` nor fetched by ``models.weights``).
        """
        data = cls.metadata_fields(props)
        if not data:
            raise ToolchainError(
                f"{source} carries no model description in its metadata (it was neither "
                "exported by convert.pth2onnx nor fetched by models.weights)"
            )
        return cls.from_dict(data, source)

    @classmethod
    def from_onnx(cls, model, source: str) -> ModelSpec:
        """The description in a loaded ``onnx.ModelProto``'s metadata (:meth:`from_metadata`)."""
        return cls.from_metadata({p.key: p.value for p in model.metadata_props}, source)

