"""The backend table: one row per inference backend, read by every tool.

A row says everything the toolchain knows about a backend: its name, the runner class that
runs it, the model file suffixes it opens, the devices it runs on, the platform string the
KServe v2 model metadata reports, how a model file's description is read without an engine,
and the Ray resource one scale-out worker holds per device kind.

============  ==================================  ============  ===========  ================
backend       runner                              suffixes      devices      KServe platform
============  ==================================  ============  ===========  ================
onnxruntime   infer.onnxruntime_runner            .onnx         cpu, cuda    onnxruntime_onnx
ais_bench     infer.ais_bench_runner              .om           npu          ascend_om
torch         infer.torch_runner                  .pth, .pt     cpu, cuda    pytorch
============  ==================================  ============  ===========  ================

The runner is named by ``"module:Class"`` and imported by ``infer.open`` when a model opens,
so this ground-floor table imports no engine and no upper layer. A new backend is one runner
module (a ``infer.base.Runner`` with a ``from_file`` constructor) plus one row here
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import ToolchainError
from models.describe import describe_checkpoint, describe_om, describe_onnx
from models.det_spec import Description
from models.spec import ModelSpec

#: ``(path, arch, sidecar, fallback) -> description``: see ``models.describe``.
Reader = Callable[[Path, "str | None", "Path | None", "ModelSpec | None"], Description]

#: Ray resources of one worker per device kind: the resource checked against the cluster's
#: capacity, and the ``map_batches`` arguments that reserve it.
RAY_RESOURCES = {
    "cpu": ("CPU", {"num_cpus": 1}),
    "cuda": ("GPU", {"num_gpus": 1}),
    "npu": ("NPU", {"resources": {"NPU": 1}}),
}


@dataclass(frozen=True)
class Backend:
    """One inference backend.

    Attributes:
        name: the backend's name (``onnxruntime``, ``ais_bench``, ``torch``).
        runner: the runner class as ``"module:Class"``; ``infer.open`` imports it.
        suffixes: model file suffixes this backend opens, lower case with the dot; the
            first is its main one.
        devices: device kinds it runs on (``cpu``, ``cuda``, ``npu``); the first is the
            default.
        platform: the ``platform`` of the KServe v2 model metadata (``GET /v2/models/m``).
        describe: reads a model file's description without an engine (``models.describe``).
    """

    name: str
    runner: str
    suffixes: tuple[str, ...]
    devices: tuple[str, ...]
    platform: str
    describe: Reader

    def ray_resources(self, kind: str) -> tuple[str, dict]:
        """The Ray resource name and ``map_batches`` arguments of one worker on a device of
        ``kind`` (:data:`RAY_RESOURCES`)."""
        return RAY_RESOURCES[kind]


#: name -> row. Tests add a fake row to prove a backend needs nothing else.
BACKENDS: dict[str, Backend] = {
    row.name: row
    for row in (
        Backend("onnxruntime", "infer.onnxruntime_runner:OnnxRuntimeRunner", (".onnx",),
                ("cpu", "cuda"), "onnxruntime_onnx", describe_onnx),
        Backend("ais_bench", "infer.ais_bench_runner:AisBenchRunner", (".om",), ("npu",),
                "ascend_om", describe_om),
        Backend("torch", "infer.torch_runner:TorchRunner", (".pth", ".pt"), ("cpu", "cuda"),
                "pytorch", describe_checkpoint),
    )
}


def suffixes() -> dict[str, str]:
    """Model file suffix -> backend name, over every row."""
    return {suffix: row.name for row in BACKENDS.values() for suffix in row.suffixes}


def backend_of(path: str | Path) -> Backend:
    """The backend row for a model file, by its suffix.

    Raises:
        ToolchainError: an unknown suffix (the known ones are listed).
    """
    suffix = Path(path).suffix.lower()
    known = suffixes()
    if suffix not in known:
        raise ToolchainError(
            f"{path}: unknown model file type {suffix or '(none)'!r}; known: {', '.join(known)}"
        )
    return BACKENDS[known[suffix]]


def describe(
    path: str | Path,
    arch: str | None = None,
    sidecar: str | Path | None = None,
    fallback: ModelSpec | None = None,
) -> Description:
    """The model description of a model file, without loading an engine: a recogniser's
    :class:`ModelSpec`, or a detector's ``DetectorSpec``; read by its backend's row.

    Args:
        path: ``.onnx``, ``.om`` (with its sidecar), ``.json`` (an .om's sidecar), or
            ``.pth``/``.pt`` (needs ``arch``, unless it carries its description, as the
            checkpoints ``train`` writes do); or a suffix of any other row.
        arch: the architecture, for checkpoints (and ONNX files exported elsewhere, which
            carry no description).
        sidecar: the .om's sidecar JSON (default: beside the .om).
        fallback: the description to use for an ONNX file that carries none (e.g. the one
            its inputs were preprocessed with), when no ``arch`` is given.

    Raises:
        ToolchainError: the file is missing or unreadable, has an unknown suffix, or carries
            no description and neither ``arch`` nor ``fallback`` was given.
    """
    path = Path(path)
    if not path.exists():
        raise ToolchainError(f"{path}: no such model file")
    if path.suffix.lower() == ".json":  # an .om's sidecar, read in place of the .om
        return describe_om(path.with_suffix(".om"), sidecar=path)
    row = backend_of(path)
    return row.describe(path, arch, Path(sidecar) if sidecar else None, fallback)
