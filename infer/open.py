"""Open a model by its file: the runner for its backend and its model description.

The suffix chooses the backend (ultralytics' one table):

| suffix | backend | description from |
| --- | --- | --- |
| ``.onnx`` | ONNX Runtime (``cpu``, ``cuda``) | ONNX metadata (convert.pth2onnx, models.weights) |
| ``.om`` | ais_bench (``npu:N``) | the sidecar JSON ``convert.atc`` writes |
| ``.pth``, ``.pt`` | PyTorch (``cpu``, ``cuda``) | the architecture's registry entry (``arch``) |

Devices are spelled the same in every tool (``infer.device``): ``cpu``, ``cuda`` or
``cuda:N``, ``npu`` or ``npu:N``; a bare ``N`` means ``npu:N`` (ais_bench's ``--device`` habit).
"""

from __future__ import annotations

from pathlib import Path

from common.errors import ToolchainError
from infer.ais_bench_runner import AisBenchRunner
from infer.base import Runner
from infer.device import Device, parse_device
from infer.onnxruntime_runner import OnnxRuntimeRunner
from infer.torch_runner import TorchRunner
from models.describe import SUFFIXES, backend_of, describe
from models.spec import ModelSpec

__all__ = ["SUFFIXES", "Device", "backend_of", "describe", "open_model", "parse_device"]
#: Devices each backend runs on.
BACKEND_DEVICES = {"onnxruntime": ("cpu", "cuda"), "torch": ("cpu", "cuda"), "ais_bench": ("npu",)}
_NAMED = {"cpu": "cpu", "cuda": "cuda[:N]", "npu": "npu[:N]"}


def open_model(
    path: str | Path,
    device: str | Device | None = None,
    *,
    threads: int | None = None,
    spin: bool = True,
    sidecar: str | Path | None = None,
    arch: str | None = None,
    rnn_layout: str = "auto",
    gate_order: str = "ifgo",
    trust: bool = False,
    fallback: ModelSpec | None = None,
) -> tuple[Runner, ModelSpec]:
    """The runner (not yet loaded) for a model file and the model's description.

    Args:
        path: the model file; its suffix chooses the backend (see the module docstring).
        device: a :class:`Device` or its spelling (``cpu``, ``cuda[:N]``, ``npu[:N]``, ``N``);
            default: ``npu:0`` for an .om, else ``cpu``.
        threads: ONNX Runtime intra-op threads (default: the available cores), or PyTorch's
            CPU threads (default: its own).
        spin: ONNX Runtime's idle threads spin-wait (see ``OnnxRuntimeRunner``).
        sidecar: an .om's sidecar JSON (default: beside it).
        arch: architecture of a checkpoint (see :func:`describe`).
        rnn_layout, gate_order, trust: checkpoint loading (``models.checkpoint``).
        fallback: see :func:`describe`.

    Raises:
        ToolchainError: an unknown suffix or device, a device the backend cannot use, or
            no description (see :func:`describe`).
    """
    path = Path(path)
    backend = backend_of(path)
    if device is None:
        device = Device("npu") if backend == "ais_bench" else Device("cpu")
    elif isinstance(device, str):
        device = parse_device(device)
    if device.kind not in BACKEND_DEVICES[backend]:
        raise ToolchainError(
            f"{path.name} runs on {backend}, which takes device "
            f"{' or '.join(_NAMED[kind] for kind in BACKEND_DEVICES[backend])}, "
            f"not {device}"
            + ("; build an .om with convert.atc for the NPU" if device.kind == "npu" else "")
        )
    spec = describe(path, arch, sidecar, fallback)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, str(device), threads, spin), spec
    if backend == "ais_bench":
        return AisBenchRunner(path, device.ordinal, sidecar), spec
    return TorchRunner(path, spec, str(device), rnn_layout, gate_order, trust, threads), spec
