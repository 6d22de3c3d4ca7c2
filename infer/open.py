"""Open a model by its file: the runner for its backend and its model description.

The suffix chooses the backend's row in the one backend table, ``models.backends``
(ultralytics' pattern): its runner class, its devices, and how its description is read.

Devices are spelled the same in every tool (``infer.device``): ``cpu``, ``cuda`` or
``cuda:N``, ``npu`` or ``npu:N``; a bare ``N`` means ``npu:N`` (ais_bench's ``--device`` habit).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TypeVar, overload

from common.errors import ToolchainError
from infer.base import OpenOptions, Runner
from infer.device import Device, parse_device
from models.backends import Backend, backend_of, describe
from models.cls_spec import ClassifierSpec
from models.det_spec import Description, DetectorSpec
from models.spec import ModelSpec

__all__ = ["Device", "OpenOptions", "backend_of", "describe", "open_model", "parse_device",
           "runner_class"]
_NAMED = {"cpu": "cpu", "cuda": "cuda[:N]", "npu": "npu[:N]"}
_KINDS = {ModelSpec: "a text recogniser", DetectorSpec: "a text detector",
          ClassifierSpec: "an image classifier"}

D = TypeVar("D", ModelSpec, DetectorSpec, ClassifierSpec)


def runner_class(row: Backend) -> type[Runner]:
    """The runner class a backend row names (``"module:Class"``), imported now (the module
    imports its engine only when a runner loads).

    Raises:
        ToolchainError: the row names a module or class that does not exist.
    """
    module_name, _, class_name = row.runner.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ToolchainError(f"backend {row.name}: its runner {row.runner} cannot be "
                             f"imported ({exc})") from None


def device_for(row: Backend, path: Path, device: str | Device | None) -> Device:
    """The device a model of backend ``row`` runs on: ``device`` parsed, default the row's
    first kind (``npu:0`` for an .om, else ``cpu``).

    Raises:
        ToolchainError: an unknown device spelling, or a kind the backend does not run on.
    """
    if device is None:
        return Device(row.devices[0])
    if isinstance(device, str):
        device = parse_device(device)
    if device.kind not in row.devices:
        raise ToolchainError(
            f"{path.name} runs on {row.name}, which takes device "
            f"{' or '.join(_NAMED.get(kind, kind) for kind in row.devices)}, not {device}"
            + ("; build an .om with convert.atc for the NPU" if device.kind == "npu" else "")
        )
    return device


@overload
def open_model(path: str | Path, device: str | Device | None = ..., *,
               expect: type[D], threads: int | None = ..., spin: bool = ...,
               sidecar: str | Path | None = ..., arch: str | None = ...,
               rnn_layout: str = ..., gate_order: str = ..., trust: bool = ...,
               fallback: ModelSpec | None = ...) -> tuple[Runner, D]: ...


@overload
def open_model(path: str | Path, device: str | Device | None = ..., *,
               expect: None = ..., threads: int | None = ..., spin: bool = ...,
               sidecar: str | Path | None = ..., arch: str | None = ...,
               rnn_layout: str = ..., gate_order: str = ..., trust: bool = ...,
               fallback: ModelSpec | None = ...) -> tuple[Runner, ModelSpec]: ...


def open_model(
    path: str | Path,
    device: str | Device | None = None,
    *,
    expect: type[Description] | None = None,
    threads: int | None = None,
    spin: bool = True,
    sidecar: str | Path | None = None,
    arch: str | None = None,
    rnn_layout: str = "auto",
    gate_order: str = "ifgo",
    trust: bool = False,
    fallback: ModelSpec | None = None,
) -> tuple[Runner, Description]:
    """The runner (not yet loaded) for a model file and the model's description.

    Args:
        path: the model file; its suffix chooses the backend (``models.backends``).
        device: a :class:`Device` or its spelling (``cpu``, ``cuda[:N]``, ``npu[:N]``, ``N``);
            default: the backend's first device kind (``npu:0`` for an .om, else ``cpu``).
        expect: the kind of model the caller wants: ``ModelSpec`` (a recogniser; the
            default), ``DetectorSpec`` (a detector) or ``ClassifierSpec`` (an image
            classifier); the description returned is of that type.
        threads: ONNX Runtime intra-op threads (default: the available cores), or PyTorch's
            CPU threads (default: its own).
        spin: ONNX Runtime's idle threads spin-wait (see ``OnnxRuntimeRunner``).
        sidecar: an .om's sidecar JSON (default: beside it).
        arch: architecture of a checkpoint (see ``models.backends.describe``).
        rnn_layout, gate_order, trust: checkpoint loading (``models.checkpoint``).
        fallback: see ``models.backends.describe``.

    Raises:
        ToolchainError: an unknown suffix or device, a device the backend cannot use, no
            description (see ``describe``), or a model of another kind than ``expect``.
    """
    path = Path(path)
    expect = expect or ModelSpec
    row = backend_of(path)
    device = device_for(row, path, device)
    spec = describe(path, arch, sidecar, fallback)
    if not isinstance(spec, expect):
        found = _KINDS.get(type(spec), type(spec).__name__)
        raise ToolchainError(f"{path}: {found}, not {_KINDS.get(expect, expect.__name__)}")
    options = OpenOptions(threads, spin, Path(sidecar) if sidecar else None, rnn_layout,
                          gate_order, trust)
    return runner_class(row).from_file(path, spec, device, options), spec
