"""Load CRNN checkpoints (.pth) into the project's PyTorch models, with clear errors.

Handles the layouts in use:
    * a bare state dict, or one wrapped under ``state_dict`` / ``model`` (ModelZoo saves
      ``{"state_dict": ..., "epoch": ...}``);
    * ``module.`` prefixes left by ``nn.DataParallel`` / distributed training;
    * CUDA- or NPU-saved tensors, loaded onto the CPU (``map_location="cpu"``);
    * the ModelZoo NPU LSTM gate order: Ascend's LSTM stores the four gate blocks of
      ``weight_ih``/``weight_hh``/``bias_ih``/``bias_hh`` as (i, g, f, o) ("igfo"), where
      PyTorch expects (i, f, g, o) ("ifgo"); ``gate_order="igfo"`` reorders them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from common.errors import ToolchainError
from models.registry import ARCHS, GATE_ORDERS, arch_entry, build_model
from models.spec import ModelSpec

log = logging.getLogger(__name__)

_LSTM_PARAM = re.compile(r"(^|\.)(weight_ih|weight_hh|bias_ih|bias_hh)_l\d+(_reverse)?$")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
#: Key of the model description in checkpoints this toolchain writes (``train``): the
#: ``ModelSpec.to_dict()`` of the trained model, so no ``--arch`` or charset is needed.
DESCRIPTION_KEY = "description"
#: Key of the ONNX graph (``models.onnx_module.GraphModule.structure``: the graph without its
#: trained tensors' data) in a checkpoint of a model converted from ONNX: with the state dict,
#: what rebuilds the module, so no registry entry or PyTorch definition is needed.
GRAPH_KEY = "onnx_graph"


def reorder_gates(tensor: torch.Tensor, source: str, target: str = "ifgo") -> torch.Tensor:
    """Reorder the four gate blocks of an LSTM parameter along dim 0.

    Args:
        tensor: ``[4 * hidden, ...]`` LSTM weight or bias, blocks in ``source`` order.
        source, target: gate orders, each a permutation of ``"ifgo"`` (see :data:`GATE_ORDERS`).

    Returns:
        The same values with blocks in ``target`` order; ``igfo <-> ifgo`` is an involution.
    """
    if sorted(source) != sorted("ifgo") or sorted(target) != sorted("ifgo"):
        raise ValueError(f"gate orders must be permutations of 'ifgo': {source!r}, {target!r}")
    if tensor.shape[0] % 4:
        raise ValueError(f"dim 0 of an LSTM parameter must be 4 * hidden, got {tensor.shape[0]}")
    blocks = dict(zip(source, tensor.chunk(4, dim=0)))
    return torch.cat([blocks[g] for g in target], dim=0)


class UnsafeCheckpoint(ToolchainError):
    """A checkpoint that pickles objects, which ``weights_only`` loading refuses."""


def _load_file(path: Path, trust: bool) -> object:
    """``torch.load`` of ``path`` on the CPU (``weights_only`` unless ``trust``).

    Raises:
        ToolchainError: the file is missing or is not a PyTorch checkpoint (one line);
            :class:`UnsafeCheckpoint` where it pickles objects and ``trust`` is off.
    """
    if not path.is_file():
        raise ToolchainError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # torch.load raises KeyError, EOFError, UnpicklingError... on junk
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        unsafe = next((ln for ln in lines if "Unsupported global" in ln), None)
        if unsafe and not trust:
            raise UnsafeCheckpoint(
                f"{path}: cannot be unpickled safely ({unsafe.split('. Please use')[0]}); "
                "if you trust the file, --trust-checkpoint allows pickled objects"
            ) from exc
        raise ToolchainError(
            f"{path}: not a PyTorch checkpoint "
            f"({type(exc).__name__}: {lines[-1].split('. ')[0][:200]})"
        ) from exc


def read_checkpoint(path: str | Path) -> dict:
    """The whole contents of a checkpoint written as a dict of tensors and plain values (as
    :func:`save_checkpoint` writes them), read without unpickling objects.

    Raises:
        ToolchainError: the file is missing, is not a PyTorch checkpoint, pickles objects, or
            is not a dict (one line naming it).
    """
    path = Path(path)
    try:
        obj = _load_file(path, trust=False)
    except UnsafeCheckpoint as exc:
        raise ToolchainError(str(exc).split("; if you trust")[0]) from None
    if not isinstance(obj, dict):
        raise ToolchainError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Args:
        path: the .pth file.
        trust: allow arbitrary pickled objects (``weights_only=False``); only for files
            you trust, e.g. old checkpoints that pickled an ``argparse.Namespace``.

    Raises:
        ToolchainError: missing file, unreadable file, or no state dict inside.
    """
    path = Path(path)
    return _state_in(_load_file(path, trust), path)


def _state_in(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict in a checkpoint's loaded contents (see :func:`read_state_dict`)."""
    if isinstance(obj, nn.Module):  # a whole pickled model (only reachable with trust)
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        kind = type(obj).__name__
        raise ToolchainError(
            f"{path}: holds a {kind}, not a state dict of tensors (save model.state_dict())"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def detect_layout(state: dict[str, torch.Tensor], layouts: tuple[str, ...]) -> str:
    """The recurrent layout of ``state`` among ``layouts``.

    ``"modelzoo"`` when the recurrent blocks are split into ``fw_rnn``/``bw_rnn`` (and the
    architecture has that layout), else the architecture's first layout.
    """
    if "modelzoo" in layouts and any(".fw_rnn." in k for k in state):
        return "modelzoo"
    return layouts[0]


def _mismatch_report(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Readable differences between ``model``'s parameters and ``state`` (the first few of each)."""
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs model)", shapes),
    ):
        if items:
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            problems.append(f"{title}: {', '.join(items[:4])}{more}")
    return problems


def load_checkpoint(
    path: str | Path,
    spec: ModelSpec,
    rnn_layout: str = "auto",
    gate_order: str = "ifgo",
    trust: bool = False,
) -> nn.Module:
    """Build the model of ``spec`` and load the checkpoint at ``path`` into it (eval mode, CPU).

    Args:
        path: the .pth file.
        spec: model description (its ``arch`` chooses the network).
        rnn_layout: recurrent layout, one of the architecture's ``rnn_layouts``
            (``models.registry``) or ``"auto"`` (detected from the keys).
        gate_order: gate order of the stored LSTM parameters (:data:`GATE_ORDERS`);
            ``"igfo"`` for ModelZoo NPU-trained checkpoints.
        trust: see :func:`read_state_dict`.

    A checkpoint of a model converted from ONNX (one carrying :data:`GRAPH_KEY`, as
    ``python -m train --init MODEL.onnx`` writes) is rebuilt from its own graph instead of the
    registry's network; ``rnn_layout`` and ``gate_order`` do not apply to it.

    Raises:
        ToolchainError: unreadable file, or keys/shapes that do not fit; the message names
            the first few problems and suggests the ``--arch``/``--rnn-layout`` that would fit.
    """
    if gate_order not in GATE_ORDERS:
        raise ToolchainError(f"gate order {gate_order!r} is unknown; use one of {GATE_ORDERS}")
    path = Path(path)
    contents = _load_file(path, trust)  # read once: the graph (if any) and the state dict
    state = _state_in(contents, path)
    graph = _graph_in(contents, path)
    if graph is not None:
        return _load_graph(path, graph, spec, state)
    layouts = arch_entry(spec.arch).rnn_layouts
    layout = detect_layout(state, layouts) if rnn_layout == "auto" else rnn_layout
    if gate_order != "ifgo":
        state = {
            k: reorder_gates(v, gate_order) if _LSTM_PARAM.search(k) else v
            for k, v in state.items()
        }
    model = build_model(spec, layout)
    problems = _mismatch_report(model, state)
    if problems:
        raise ToolchainError(
            f"{path} does not fit --arch {spec.arch}"
            + (f" --rnn-layout {layout}" if len(layouts) > 1 else "")
            + ": "
            + "; ".join(problems)
            + _suggest(state, spec.arch, layout)
        )
    model.load_state_dict(state, strict=False)  # strict keys were checked above
    log.info("loaded %s as %s (layout %s, gate order %s)", path, spec.arch, layout, gate_order)
    return model


def _graph_in(contents: object, path: Path) -> bytes | None:
    """The ONNX graph in a checkpoint's loaded ``contents`` (:data:`GRAPH_KEY`: a model
    converted from ONNX), or None."""
    graph = contents.get(GRAPH_KEY) if isinstance(contents, dict) else None
    if graph is not None and not isinstance(graph, bytes):
        raise ToolchainError(f"{path}: its {GRAPH_KEY} is a {type(graph).__name__}, not the "
                             "serialised ONNX graph")
    return graph


def _load_graph(path: Path, graph: bytes, spec: ModelSpec,
                state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a converted model (``models.onnx_module.GraphModule``) from its graph and load
    ``state``; it returns logits where ``spec`` says so (training's checkpoints), else the
    graph's own output."""
    import onnx
    from google.protobuf.message import DecodeError

    from models.onnx_module import GraphModule

    try:
        proto = onnx.load_from_string(graph)
    except DecodeError as exc:
        raise ToolchainError(f"{path}: its {GRAPH_KEY} is not a readable ONNX graph "
                             f"({exc})") from None
    try:
        model = GraphModule(proto)
    except ToolchainError as exc:
        raise ToolchainError(f"{path}: {exc}") from None
    model.logits = spec.output_kind == "logits" and model.logits_name is not None
    problems = _mismatch_report(model, state)
    if problems:
        raise ToolchainError(f"{path}: its weights do not fit its own graph: "
                             + "; ".join(problems))
    model.load_state_dict(state, strict=False)  # strict keys were checked above
    log.info("loaded %s as %s converted from ONNX", path, spec.arch)
    return model.eval()


def _suggest(state: dict[str, torch.Tensor], arch: str, layout: str) -> str:
    """A hint naming an ``--arch``/``--rnn-layout`` whose parameters fit ``state`` exactly."""
    for entry in ARCHS.values():
        if entry.build is None:
            continue
        for other_layout in entry.rnn_layouts:
            if (entry.name, other_layout) == (arch, layout):
                continue
            if not _mismatch_report(build_model(entry.spec, other_layout), state):
                hint = f"--arch {entry.name}"
                if len(entry.rnn_layouts) > 1:
                    hint += f" --rnn-layout {other_layout}"
                return f". The checkpoint fits {hint}"
    return ". Check --arch and --rnn-layout"


def read_description(path: str | Path) -> ModelSpec | None:
    """The model description a checkpoint carries (:data:`DESCRIPTION_KEY`), or None.

    A checkpoint that pickles objects (older training scripts) is not read here: None, so
    the caller asks for ``--arch`` (and :func:`read_state_dict` for ``--trust-checkpoint``).

    Raises:
        ToolchainError: the file is missing or not a PyTorch checkpoint (a truncated or
            foreign file), or its description is malformed.
    """
    path = Path(path)
    try:
        obj = _load_file(path, trust=False)
    except UnsafeCheckpoint:
        return None
    return description_in(obj, path)


def description_in(contents: object, path: str | Path) -> ModelSpec | None:
    """The model description in a checkpoint's loaded ``contents`` (as :func:`read_checkpoint`
    returns them), or None where it carries none; ``path`` names it in errors.

    Raises:
        ToolchainError: the description is malformed.
    """
    if not isinstance(contents, dict) or not isinstance(contents.get(DESCRIPTION_KEY), dict):
        return None
    return ModelSpec.from_dict(contents[DESCRIPTION_KEY], f"{path} ({DESCRIPTION_KEY})")


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec,
                   **extra: object) -> None:
    """Write ``model``'s state dict with its description (and ``extra`` plain values) to
    ``path``, whole or not at all (written aside, then renamed). A model converted from ONNX
    (``models.onnx_module.GraphModule``) also stores its graph (:data:`GRAPH_KEY`), from which
    :func:`load_checkpoint` rebuilds it.

    Raises:
        ToolchainError: the file cannot be written (a full disk, a file size limit, no
            permission), naming ``path``; nothing is left at ``path`` or beside it.
    """
    from common.outputs import atomic_path
    from models.onnx_module import GraphModule

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, GraphModule):
        extra = {GRAPH_KEY: model.structure(), **extra}
    with atomic_path(Path(path)) as partial:
        try:
            torch.save({"state_dict": state, DESCRIPTION_KEY: spec.to_dict(), **extra}, partial)
        except (OSError, RuntimeError) as exc:  # torch's writer reports a failed write as
            # RuntimeError ("PytorchStreamWriter failed writing file ...")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ToolchainError(f"{path}: cannot be written ({reason})") from None
