"""An ONNX graph as a trainable PyTorch module: the shipped recognisers become fine-tunable.

:class:`GraphModule` runs an ONNX graph node by node with PyTorch operations (the ONNX
operator semantics of https://onnx.ai/onnx/operators/, at the graph's own opset), so autograd
flows through it and every stored weight is a ``torch.nn.Parameter``:

* each ``Conv`` becomes an ``nn.Conv2d`` (``nn.Conv1d`` for 1-D), in graph order under
  ``layers``, so freezing the first N convolutions and channels-last layouts work as for the
  project's own networks;
* each ``BatchNormalization`` becomes a :class:`GraphBatchNorm` (an ``nn.BatchNorm`` of any
  rank: its scale and bias train, its running statistics are buffers that a model in eval
  mode, or under ``train.trainer.freeze_batchnorm``, keeps);
* every other floating-point tensor with more than one element, stored as an initializer or
  a ``Constant`` node, becomes a parameter under ``weights`` (MatMul weights, biases, layer
  norm scales); scalars and integer tensors (epsilons, shapes, axes) stay constants.

Only the graph's structure and those tensors' names are needed to rebuild the module:
:meth:`GraphModule.structure` is the graph with the trained tensors' data left out (what a
checkpoint stores beside the state dict), and :meth:`GraphModule.to_onnx` writes the current
weights back into the original graph, so an exported fine-tuned model has exactly the shipped
model's nodes, names, opset and dynamic axes.

A CTC recogniser's graph ends in a ``Softmax`` over classes; with ``logits=True`` the module
returns that Softmax's input instead (what ``torch.nn.CTCLoss`` wants after ``log_softmax``).

No general converter is used: onnx2torch, the well-kept one, imports torchvision, which has
no build here for the CPU PyTorch this project pins (its PyPI wheels need CUDA's libraries).
The operators below cover the PP-OCR recognisers (v4, v6) and common CNN/transformer CTC
heads; an unsupported one is named, with its node, before anything runs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from common.errors import ToolchainError
from models.fake_quant import FakeQuant

#: ONNX tensor element types -> torch dtypes (the ones a recogniser's graph computes in).
TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)


class GraphBatchNorm(nn.modules.batchnorm._BatchNorm):
    """ONNX ``BatchNormalization`` on an input of any rank >= 2 (channels on axis 1)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 (torch's name)
        if input.dim() < 2:
            raise ValueError(f"BatchNormalization needs rank >= 2 input, got {input.dim()}")


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _has_data(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.raw_data or tensor.float_data or tensor.double_data
                or tensor.int32_data or tensor.int64_data or tensor.uint64_data
                or tensor.string_data) or 0 in tensor.dims


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; zeros of its shape where its data was left out."""
    if _has_data(tensor):
        return numpy_helper.to_array(tensor).copy()
    return np.zeros(tuple(tensor.dims), onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _trainable(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _FLOATS and int(np.prod(tensor.dims, dtype=np.int64)) > 1


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def _ints(value: torch.Tensor | None) -> list[int] | None:
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _padding(node: onnx.NodeProto, attrs: dict, kernel: tuple[int, ...]
             ) -> tuple[int, ...] | Callable[[torch.Size], list[int]]:
    """A Conv's or pool's padding: PyTorch's symmetric ``padding`` per spatial axis where the
    node's is symmetric and fixed, else a function from the input's shape to ``F.pad``'s
    list (``auto_pad`` SAME_UPPER/SAME_LOWER, whose padding depends on the input size, and
    asymmetric ``pads``)."""
    rank = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        def same(shape: torch.Size) -> list[int]:
            pads: list[int] = []
            for axis in reversed(range(rank)):  # F.pad lists the last axis first
                size = shape[2 + axis]
                extent = (kernel[axis] - 1) * dilations[axis] + 1
                total = max(0, (-(-size // strides[axis]) - 1) * strides[axis] + extent - size)
                small, large = total // 2, total - total // 2
                pads += [small, large] if auto == "SAME_UPPER" else [large, small]
            return pads
        return same
    if auto not in ("NOTSET", "VALID"):
        raise ToolchainError(f"{_node_label(node)}: auto_pad {auto} is not supported")
    pads = list(attrs.get("pads", [0] * 2 * rank)) if auto == "NOTSET" else [0] * 2 * rank
    if pads[:rank] == pads[rank:]:
        return tuple(pads[:rank])
    explicit = [v for axis in reversed(range(rank)) for v in (pads[axis], pads[rank + axis])]
    return lambda shape: explicit


class GraphModule(nn.Module):
    """An ONNX graph with one image input and one output as a ``torch.nn.Module``.

    Args:
        model: the ONNX model (a recogniser as shipped, or :meth:`structure`'s copy of one;
            tensors without data start as zeros, for a state dict to fill).
        logits: return the input of the graph's final ``Softmax`` (class scores before it)
            instead of the graph's output.

    ``forward(x)``: ``x`` float32 in the graph's input layout (a recogniser's
    ``[N, C, H, W]``); returns the output tensor (``[N, T, classes]`` for PP-OCR's).

    Raises:
        ToolchainError: the graph has several inputs or outputs, an operator this module does
            not implement (all of them named), a Conv whose weight is computed rather than
            stored, or ``logits=True`` on a graph whose output is not a Softmax over the last
            axis.
    """

    def __init__(self, model: onnx.ModelProto, logits: bool = False):
        super().__init__()
        graph = model.graph
        stored = {t.name: t for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in stored]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ToolchainError(f"the graph has {len(inputs)} inputs and {len(graph.output)} "
                                 "outputs; a recogniser has one of each")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          11)
        missing = sorted({_node_label(n) for n in graph.node if n.op_type not in _OPS
                          and n.op_type not in ("Conv", "BatchNormalization", "Constant")})
        if missing:
            raise ToolchainError("operators not supported by the ONNX-to-PyTorch conversion: "
                                 + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self.layers = nn.ModuleDict()
        self.weights = nn.ParameterDict()
        self._constants: dict[str, torch.Tensor] = {}  # integer constants, kept on the CPU
        self._sources: dict[str, str] = {}  # state dict key -> ONNX tensor name
        self._keys: dict[str, str] = {}  # ONNX tensor name -> its parameter's key in weights
        self._float_constants: list[str] = []
        self._pad_first: dict[str, Callable] = {}  # Conv key -> F.pad list of its input shape
        for node in graph.node:
            if node.op_type == "Constant":
                tensor = _constant_tensor(node)
                stored[node.output[0]] = tensor
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        self._steps: list[tuple[str, list[str], list[str], dict, str | None]] = []
        # node's first output -> {input position: its rounding}; empty unless fake_quantize
        self._rounding: dict[str, dict[int, FakeQuant]] = {}
        self._first_output = {node.name: node.output[0] for node in graph.node
                              if node.name and node.op_type != "Constant"}
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            layer = None
            if node.op_type == "Conv":
                layer = self._conv(node, stored, consumers)
            elif node.op_type == "BatchNormalization":
                layer = self._batchnorm(node, stored, consumers)
            else:
                for name in node.input:
                    if name and name in stored:
                        self._register(name, stored[name])
            attrs = _attrs(node)
            if node.op_type in ("MaxPool", "AveragePool"):
                attrs["padding"] = _pool_padding(node, attrs)
            self._steps.append((node.op_type, list(node.input), list(node.output), attrs,
                                layer))
        self.logits_name = None
        producer = {o: n for n in graph.node for o in n.output}
        last = producer.get(self.output_name)
        rank = len(graph.output[0].type.tensor_type.shape.dim)
        if last is not None and last.op_type == "Softmax":
            axis = _attrs(last).get("axis", -1 if self.opset >= 13 else 1)
            if axis in (-1, rank - 1):
                self.logits_name = last.input[0]
        elif last is not None and last.op_type == "Reshape":
            # onnx.version_converter writes an opset < 13 Softmax over the last axis as
            # Flatten(axis = rank - 1) -> Softmax -> Reshape(back to the Flatten's input shape)
            softmax = producer.get(last.input[0])
            flatten = producer.get(softmax.input[0]) if softmax is not None else None
            shape = producer.get(last.input[1])
            if (softmax is not None and softmax.op_type == "Softmax"
                    and _attrs(softmax).get("axis", 1) in (-1, 1)
                    and flatten is not None and flatten.op_type == "Flatten"
                    and _attrs(flatten).get("axis", 1) == rank - 1
                    and shape is not None and shape.op_type == "Shape"
                    and shape.input[0] == flatten.input[0]):
                self.logits_name = flatten.input[0]
        if logits and self.logits_name is None:
            raise ToolchainError("the graph's output is not a Softmax over its last axis, so "
                                 "its logits cannot be taken")
        self.logits = logits
        self.source: Path | None = None  # the file it was read from (read_graph)
        # The graph is kept without the data the state dict holds: what structure() stores
        # and to_onnx() fills in again.
        self._model = copy.deepcopy(model)
        tensors = self._tensors_of(self._model)
        for name in set(self._sources.values()):
            for field in ("raw_data", "float_data", "double_data", "int32_data",
                          "int64_data"):
                tensors[name].ClearField(field)

    # -- construction -------------------------------------------------------------------

    def _key(self, name: str) -> str:
        key = re.sub(r"\W", "_", name) or "_"
        while key in self.layers or key in self.weights:
            key += "_"
        return key

    def _register(self, name: str, tensor: onnx.TensorProto) -> None:
        if name in self._keys or name in self._constants or name in self._float_constants:
            return
        values = torch.from_numpy(_array(tensor))
        if _trainable(tensor):
            key = self._key(name)
            self.weights[key] = nn.Parameter(values)
            self._keys[name] = key
            self._sources[f"weights.{key}"] = name
        elif tensor.data_type in _FLOATS:  # a scalar: moves with the module, not trained
            self.register_buffer(f"_c{len(self._float_constants)}", values, persistent=False)
            self._float_constants.append(name)
        else:
            self._constants[name] = values

    def _stored(self, node: onnx.NodeProto, stored: dict, consumers: dict, position: int,
                role: str) -> onnx.TensorProto | None:
        if len(node.input) <= position or not node.input[position]:
            return None
        name = node.input[position]
        if name not in stored:
            raise ToolchainError(f"{_node_label(node)}: its {role} {name!r} is computed, not "
                                 "stored; only stored weights can be trained")
        if consumers.get(name, 0) > 1:
            raise ToolchainError(f"{_node_label(node)}: its {role} {name!r} is shared with "
                                 "other nodes, which this conversion does not support")
        return stored[name]

    def _conv(self, node, stored, consumers) -> str:
        weight = self._stored(node, stored, consumers, 1, "weight")
        bias = self._stored(node, stored, consumers, 2, "bias")
        attrs = _attrs(node)
        spatial = len(weight.dims) - 2
        if spatial not in (1, 2):
            raise ToolchainError(f"{_node_label(node)}: {spatial}-D convolution is not supported")
        kind = nn.Conv2d if spatial == 2 else nn.Conv1d
        groups = int(attrs.get("group", 1))
        out_channels, per_group, *kernel = (int(d) for d in weight.dims)
        padding = _padding(node, attrs, tuple(kernel))
        layer = kind(per_group * groups, out_channels, tuple(kernel),
                     stride=tuple(attrs.get("strides", [1] * spatial)),
                     padding=padding if isinstance(padding, tuple) else 0,
                     dilation=tuple(attrs.get("dilations", [1] * spatial)),
                     groups=groups, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(_array(weight)))
            if bias is not None:
                layer.bias.copy_(torch.from_numpy(_array(bias)))
        key = self._key(node.name or node.output[0])
        self.layers[key] = layer
        if not isinstance(padding, tuple):
            self._pad_first[key] = padding
        self._sources[f"layers.{key}.weight"] = node.input[1]
        if bias is not None:
            self._sources[f"layers.{key}.bias"] = node.input[2]
        return key

    def _batchnorm(self, node, stored, consumers) -> str:
        scale, bias, mean, var = (self._stored(node, stored, consumers, k, role) for k, role in
                                  enumerate(("scale", "bias", "mean", "variance"), start=1))
        attrs = _attrs(node)
        layer = GraphBatchNorm(int(scale.dims[0]), eps=float(attrs.get("epsilon", 1e-5)),
                               momentum=1.0 - float(attrs.get("momentum", 0.9)))
        with torch.no_grad():
            for target, tensor in ((layer.weight, scale), (layer.bias, bias),
                                   (layer.running_mean, mean), (layer.running_var, var)):
                target.copy_(torch.from_numpy(_array(tensor)))
        layer.eval()
        key = self._key(node.name or node.output[0])
        self.layers[key] = layer
        for field, position in (("weight", 1), ("bias", 2), ("running_mean", 3),
                                ("running_var", 4)):
            self._sources[f"layers.{key}.{field}"] = node.input[position]
        return key

    # -- running --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x, **self._constants}
        values.update((name, getattr(self, f"_c{k}"))
                      for k, name in enumerate(self._float_constants))
        values.update((name, self.weights[key]) for name, key in self._keys.items())
        wanted = self.logits_name if self.logits else self.output_name
        for op, inputs, outputs, attrs, layer in self._steps:
            rounding = self._rounding.get(outputs[0]) if self._rounding else None
            if op in ("Conv", "BatchNormalization"):
                x = values[inputs[0]]
                if rounding and 0 in rounding:
                    x = rounding[0].apply(x)
                if layer in self._pad_first:
                    x = F.pad(x, self._pad_first[layer](x.shape))
                module = self.layers[layer]
                if rounding and 1 in rounding and op == "Conv":
                    weight = rounding[1].apply(module.weight, recompute=True)
                    results = [module._conv_forward(x, weight, module.bias)]
                else:
                    results = [module(x)]
            else:
                args = [values[name] if name else None for name in inputs]
                if rounding:
                    args = [arg if arg is None or k not in rounding else rounding[k].apply(
                        arg, recompute=rounding[k].kind == "weight" and inputs[k] in self._keys)
                        for k, arg in enumerate(args)]
                results = _OPS[op](self, args, attrs)
                if isinstance(results, torch.Tensor):
                    results = [results]
            for name, value in zip(outputs, results):
                values[name] = value
            if wanted in values:
                return values[wanted]
        return values[wanted]

    # -- quantisation-aware training ---------------------------------------------------------

    def fake_quantize(self, rounding: dict[tuple[str, int], FakeQuant] | None) -> int:
        """Round node inputs as an int8 model of this graph does, in every later forward.

        Args:
            rounding: :func:`models.fake_quant.read_qdq` of a QDQ model quantised from this
                graph (node inputs keyed by the node's name, else its first output, and the
                input's position), or None to compute in plain float again. Weights being trained
                (Conv weights, parameters) get scales from their current values; activations
                and constants keep the int8 model's.

        Returns:
            How many node inputs are rounded.

        Raises:
            ToolchainError: ``rounding`` names nodes or inputs this graph lacks (the int8 model
                was not quantised from it).
        """
        if not rounding:
            self._rounding = {}
            return 0
        arity = {outputs[0]: len(inputs) for _, inputs, outputs, _, _ in self._steps}
        grouped: dict[str, dict[int, FakeQuant]] = {}
        strange = []
        for (node, position), how in rounding.items():
            output = self._first_output.get(node, node)
            if position >= arity.get(output, 0):
                strange.append(f"{node}[{position}]")
            grouped.setdefault(output, {})[position] = how
        if strange:
            raise ToolchainError(
                f"the int8 model rounds {len(strange)} node input(s) this graph lacks (e.g. "
                f"{', '.join(sorted(strange)[:3])}): it was not quantised from this graph")
        self._rounding = grouped
        return len(rounding)

    # -- writing ---------------------------------------------------------------------------

    def _tensors_of(self, model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
        """ONNX tensor name -> its TensorProto in ``model`` (initializers and Constants)."""
        found = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        found[node.output[0]] = attribute.t
        return found

    def to_onnx(self) -> onnx.ModelProto:
        """The original graph with this module's current weights written into its tensors
        (same dtypes, names, nodes and metadata); the module is not changed."""
        model = copy.deepcopy(self._model)
        tensors = self._tensors_of(model)
        for key, value in self.state_dict().items():
            name = self._sources.get(key)
            if name is None:
                continue  # num_batches_tracked
            tensor = tensors[name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(
                value.detach().cpu().numpy().astype(dtype).reshape(tuple(tensor.dims)), name))
        return model

    def structure(self) -> bytes:
        """The serialised graph with the data of every tensor the state dict holds left out
        (their names, types and shapes stay): with the state dict, all that rebuilds this
        module (``GraphModule(onnx.load_from_string(...))`` then ``load_state_dict``)."""
        return self._model.SerializeToString()

    def convolutions(self) -> list[tuple[str, nn.Module]]:
        """``(ONNX node's key, layer)`` of every convolution, in graph order: what
        ``--freeze-convs N`` counts."""
        return [(key, layer) for key, layer in self.layers.items()
                if isinstance(layer, nn.modules.conv._ConvNd)]


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    attrs = _attrs(node)
    name = node.output[0]
    if "value" in attrs:
        tensor = copy.deepcopy(attrs["value"])
        tensor.name = name
        return tensor
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return numpy_helper.from_array(np.asarray(attrs[key], dtype), name)
    raise ToolchainError(f"{_node_label(node)}: only tensor and numeric Constants are supported")


def read_graph(path: str | Path, logits: bool = False) -> GraphModule:
    """:class:`GraphModule` of the ONNX file at ``path`` (eval mode; ``source`` is the path).

    Raises:
        ToolchainError: the file is not a readable ONNX model (named), or see
            :class:`GraphModule`.
    """
    from models.onnx_file import load_onnx

    model = load_onnx(path)
    try:
        module = GraphModule(model, logits=logits).eval()
    except ToolchainError as exc:
        raise ToolchainError(f"{path}: {exc}") from None
    module.source = Path(path)
    return module


# -- operators ----------------------------------------------------------------------------
# Each takes (module, inputs (None for an omitted optional one), attributes) and returns a
# tensor or a list of tensors, following the ONNX operator specification at module.opset.

Op = Callable[[GraphModule, list, dict], "torch.Tensor | list[torch.Tensor]"]


def _axes(module: GraphModule, args: list, attrs: dict, position: int) -> list[int] | None:
    """An operator's axes: an attribute before the opset that made them an input."""
    if "axes" in attrs:
        return list(attrs["axes"])
    return _ints(args[position]) if len(args) > position else None


def _div(_, args, attrs):
    a, b = args
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _softmax(kind: Callable) -> Op:
    def run(module, args, attrs):
        x = args[0]
        axis = attrs.get("axis", -1 if module.opset >= 13 else 1)
        axis = axis % x.dim()
        if module.opset >= 13 or axis == x.dim() - 1:
            return kind(x, dim=axis)
        # before opset 13: the input is coerced to 2-D at axis
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return kind(flat, dim=1).reshape(x.shape)
    return run


def _reduce(kind: Callable) -> Op:
    def run(module, args, attrs):
        x = args[0]
        axes = _axes(module, args, attrs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return kind(x, dim=[a % x.dim() for a in axes], keepdim=keep)
    return run


def _slice(module, args, attrs):
    x = args[0]
    if module.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = list(attrs.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(
            range(len(starts)))
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise ToolchainError(f"Slice with step {step} is not supported")
        index[axis % x.dim()] = slice(start, end, step)
    return x[tuple(index)]


def _squeeze(module, args, attrs):
    x = args[0]
    axes = _axes(module, args, attrs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(module, args, attrs):
    x = args[0]
    axes = _axes(module, args, attrs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _reshape(module, args, attrs):
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return x.reshape(shape)


def _gather(module, args, attrs):
    x, indices = args
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.to(torch.long)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = torch.index_select(x, axis, indices.reshape(-1).to(x.device))
    return picked.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


def _pool_padding(node: onnx.NodeProto, attrs: dict
                  ) -> tuple[int, ...] | Callable[[torch.Size], list[int]]:
    """A MaxPool's or AveragePool's padding (:func:`_padding`), worked out once.

    Raises:
        ToolchainError: an AveragePool whose padding is asymmetric or depends on the input
            size and that leaves the padding out of its averages (``count_include_pad`` 0):
            PyTorch's pooling cannot leave out padding added before it.
    """
    padding = _padding(node, attrs, tuple(attrs["kernel_shape"]))
    if (node.op_type == "AveragePool" and not isinstance(padding, tuple)
            and not attrs.get("count_include_pad", 0)):
        raise ToolchainError(f"{_node_label(node)}: asymmetric or SAME padding without "
                             "count_include_pad is not supported")
    return padding


def _pool(kind: str) -> Op:
    def run(module, args, attrs):
        x = args[0]
        kernel = tuple(attrs["kernel_shape"])
        spatial = len(kernel)
        strides = tuple(attrs.get("strides", [1] * spatial))
        padding = attrs["padding"]  # _pool_padding's, worked out when the module was built
        ceil = bool(attrs.get("ceil_mode", 0))
        if not isinstance(padding, tuple):  # padded values never win a max (average pools
            # padded here count the padding, which _pool_padding allows only where ONNX does)
            x = F.pad(x, padding(x.shape), value=-math.inf if kind == "Max" else 0.0)
            padding = (0,) * spatial
        if kind == "Max":
            pool = F.max_pool2d if spatial == 2 else F.max_pool1d
            return pool(x, kernel, strides, padding,
                        tuple(attrs.get("dilations", [1] * spatial)), ceil_mode=ceil)
        pool = F.avg_pool2d if spatial == 2 else F.avg_pool1d
        return pool(x, kernel, strides, padding, ceil_mode=ceil,
                    count_include_pad=bool(attrs.get("count_include_pad", 0)))
    return run


def _clip(module, args, attrs):
    x = args[0]
    if module.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = args[1] if len(args) > 1 else None
        high = args[2] if len(args) > 2 else None
    return torch.clamp(x, low, high)


def _gemm(module, args, attrs):
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        out = out + float(attrs.get("beta", 1.0)) * args[2]
    return out


def _transpose(module, args, attrs):
    x = args[0]
    return x.permute(*attrs.get("perm", range(x.dim() - 1, -1, -1)))


def _shape(module, args, attrs):
    dims = list(args[0].shape)[attrs.get("start", 0):attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(module, args, attrs):
    return args[0].to(TORCH_DTYPES[attrs["to"]])


def _concat(module, args, attrs):
    return torch.cat([a for a in args if a is not None and a.numel()] or args[:1],
                     dim=attrs["axis"])


def _flatten(module, args, attrs):
    x = args[0]
    axis = attrs.get("axis", 1) % max(1, x.dim())
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _split(module, args, attrs):
    x = args[0]
    axis = attrs.get("axis", 0)
    sizes = attrs.get("split") or (_ints(args[1]) if len(args) > 1 and args[1] is not None
                                   else None)
    if sizes is None:
        count = attrs.get("num_outputs")
        return list(torch.chunk(x, count, dim=axis)) if count else [x]
    return list(torch.split(x, list(sizes), dim=axis))


def _binary(kind: Callable) -> Op:
    return lambda module, args, attrs: kind(args[0], args[1])


def _unary(kind: Callable) -> Op:
    return lambda module, args, attrs: kind(args[0])


_OPS: dict[str, Op] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _div, "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul),
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "Max": lambda module, args, attrs: torch.stack(torch.broadcast_tensors(*args)).amax(0),
    "Min": lambda module, args, attrs: torch.stack(torch.broadcast_tensors(*args)).amin(0),
    "Where": lambda module, args, attrs: torch.where(args[0], args[1], args[2]),
    "Identity": _unary(lambda x: x), "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": lambda module, args, attrs: torch.clamp(
        float(attrs.get("alpha", 0.2)) * args[0] + float(attrs.get("beta", 0.5)), 0.0, 1.0),
    "LeakyRelu": lambda module, args, attrs: F.leaky_relu(args[0],
                                                          float(attrs.get("alpha", 0.01))),
    "Gelu": lambda module, args, attrs: F.gelu(args[0], approximate=(
        "tanh" if attrs.get("approximate", b"none") in (b"tanh", "tanh") else "none")),
    "Clip": _clip, "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax), "ReduceMin": _reduce(torch.amin),
    "GlobalAveragePool": lambda module, args, attrs: args[0].mean(
        dim=tuple(range(2, args[0].dim())), keepdim=True),
    "MaxPool": _pool("Max"), "AveragePool": _pool("Average"),
    "Gemm": _gemm, "Transpose": _transpose, "Reshape": _reshape, "Flatten": _flatten,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Slice": _slice,
    "Split": _split, "Gather": _gather, "Shape": _shape, "Cast": _cast,
    "Expand": lambda module, args, attrs: args[0] * torch.ones(
        _ints(args[1]), dtype=args[0].dtype, device=args[0].device),
}


def supported_operators() -> Iterable[str]:
    """The ONNX operators :class:`GraphModule` runs, sorted."""
    return sorted({*_OPS, "Conv", "BatchNormalization", "Constant"})
