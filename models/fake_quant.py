"""Where an int8 QDQ model rounds, read back as fake quantisation for training.

ONNX Runtime's static quantisation (QDQ format, ``convert.quantize``) puts a
QuantizeLinear/DequantizeLinear pair on every activation it quantises and a DequantizeLinear
on every weight it stores as integers; the nodes between keep the fp32 graph's nodes and
output names. :func:`read_qdq` reads, for every node input that the int8 model rounds, how it
rounds it, so that :class:`models.onnx_module.GraphModule` built from the same fp32 graph can
compute the int8 model's arithmetic in floating point (``torch.fake_quantize_per_*_affine``,
gradients passed straight through inside the range: Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018) and be
fine-tuned to it: quantisation-aware training.

Rounding follows the ONNX operators (https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html):
``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x' = (q - zero_point) * scale``.
Weights are rounded with scales recomputed from their current values the way ONNX Runtime's
quantiser computes them (``onnxruntime.quantization.quant_utils.compute_scale_zp``, symmetric:
``scale = max|w| / qmax`` per output channel), so the trained weights round at export exactly
as they did in training; activations and constants keep the int8 model's scales. Integer
biases (int32, scale = input scale x weight scale) are left in float: their rounding is below
the activations' by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from common.errors import ToolchainError

#: Integer ranges of the stored types: ONNX tensor type -> (qmin, qmax).
_RANGES = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


@dataclass(frozen=True)
class FakeQuant:
    """How the int8 model rounds one node input.

    Attributes:
        kind: ``"activation"`` (a computed tensor: QuantizeLinear then DequantizeLinear),
            ``"weight"`` (an initializer stored as integers, symmetric) or ``"constant"`` (an
            initializer stored as integers with a zero point).
        qmin, qmax: the integer range (a symmetric int8 weight: -127..127, or -64..64 with
            7-bit weights).
        scale: float32, one value (per tensor) or one per slice along ``axis``.
        zero_point: int, the same shape as ``scale``.
        axis: the axis of per-channel scales, or None.
        floor: a weight's least scales (the int8 model's, where ONNX Runtime raised them
            above ``max|w| / qmax`` so that the bias fits its int32 range; 0 elsewhere), or
            None.
    """

    kind: str
    qmin: int
    qmax: int
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    floor: np.ndarray | None = None

    def apply(self, value: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """``value`` rounded as the int8 model rounds it (same dtype and shape); with
        ``recompute`` (a weight being trained) the scales come from ``value`` itself."""
        if recompute:
            kept = None if self.axis is None else self.axis % value.dim()
            reduce = [d for d in range(value.dim()) if d != kept]
            largest = value.detach().abs().amax(dim=reduce) if reduce else value.detach().abs()
            scale = largest / self.qmax
            if self.floor is not None:
                scale = torch.maximum(scale, torch.as_tensor(
                    self.floor, dtype=scale.dtype, device=scale.device).reshape(scale.shape))
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = torch.as_tensor(self.scale, dtype=torch.float32, device=value.device)
            zero = torch.as_tensor(self.zero_point, dtype=torch.int32, device=value.device)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(
                value, scale.reshape(()), zero.reshape(()), self.qmin, self.qmax)
        axis = self.axis % value.dim()
        return torch.fake_quantize_per_channel_affine(
            value, scale.reshape(-1).float(), zero.reshape(-1), axis, self.qmin, self.qmax)


def read_qdq(model: onnx.ModelProto) -> dict[tuple[str, int], FakeQuant]:
    """The rounding of every node input of a QDQ model.

    Returns:
        ``{(the consuming node's name, input position): FakeQuant}`` (an unnamed node: its
        first output's name). Node names are those of the fp32 graph the model was quantised
        from (ONNX Runtime keeps them; a Relu or Clip it folded into the node before is gone,
        its range kept in that node's output rounding).

    Raises:
        ToolchainError: the model has no QuantizeLinear/DequantizeLinear nodes, or one whose
            scale or zero point is not stored.
    """
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            stored[node.output[0]] = node.attribute[0].t
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[tuple[str, int], FakeQuant] = {}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for position, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            rounding = _rounding(dq, producer, stored)
            if rounding is not None:
                found[(node.name or node.output[0], position)] = rounding
    if not found:
        raise ToolchainError("the model has no QuantizeLinear/DequantizeLinear pairs: it is "
                             "not an int8 QDQ model")
    return found


def _rounding(dq: onnx.NodeProto, producer: dict, stored: dict) -> FakeQuant | None:
    """How ``dq``'s output was rounded; None for an int32 bias (left in float)."""
    scale, zero = _parameter(dq, 1, stored), _parameter(dq, 2, stored)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    source = dq.input[0]
    if source in stored:
        values = stored[source]
        if values.data_type not in _RANGES:
            return None  # an int32 bias
        qmin, qmax = _RANGES[values.data_type]
        integers = numpy_helper.to_array(values)
        symmetric = values.data_type == onnx.TensorProto.INT8 and not zero.any()
        if symmetric:  # ONNX Runtime's symmetric range: -127..127, or -64..64 with 7-bit
            # weights; each channel's largest weight lands on the range's end
            qmax = 64 if np.abs(integers.astype(np.int32)).max(initial=0) <= 64 else 127
            qmin = -qmax
        per_axis = axis if scale.size > 1 else None
        floor = None
        if symmetric:  # a slice whose largest integer is short of qmax had its scale raised
            largest = np.abs(integers.astype(np.int32))
            if per_axis is not None:
                largest = largest.max(axis=tuple(d for d in range(largest.ndim)
                                                 if d != per_axis % largest.ndim))
            else:
                largest = largest.max(initial=0)
            floor = np.where(largest.reshape(scale.shape) < qmax - 1, scale, 0).astype(
                np.float32)
        return FakeQuant("weight" if symmetric else "constant", qmin, qmax, scale, zero,
                         per_axis, floor)
    quantize = producer.get(source)
    if quantize is None or quantize.op_type != "QuantizeLinear":
        raise ToolchainError(f"DequantizeLinear {dq.name or dq.output[0]!r} reads "
                             f"{source!r}, which is neither stored nor quantised")
    qmin, qmax = _RANGES[stored[quantize.input[2]].data_type] if len(quantize.input) > 2 \
        else (0, 255)
    return FakeQuant("activation", qmin, qmax, scale, zero, axis if scale.size > 1 else None)


def _parameter(node: onnx.NodeProto, position: int, stored: dict) -> np.ndarray:
    if len(node.input) <= position or not node.input[position]:
        return np.zeros((), dtype=np.int32)  # the zero point defaults to 0
    name = node.input[position]
    if name not in stored:
        raise ToolchainError(f"{node.op_type} {node.name or node.output[0]!r}: its "
                             f"{'scale' if position == 1 else 'zero point'} {name!r} is "
                             "computed, not stored")
    return numpy_helper.to_array(stored[name])
