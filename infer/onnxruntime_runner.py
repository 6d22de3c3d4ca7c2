"""ONNX Runtime backend: the default engine here (CPU), CUDA where installed and asked for."""
# The engine's exceptions are the classes pybind11 registers in
# ``onnxruntime.capi.onnxruntime_pybind11_state`` (Fail, InvalidArgument, ...); they derive
# from Exception directly, so they are listed rather than caught by a base class.

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from infer.base import InputSpec, Runner
from infer.device import parse_device

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception classes ONNX Runtime's Python binding raises (Fail, InvalidArgument, ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception))


class OnnxRuntimeRunner(Runner):
    """Runs an .onnx model with ONNX Runtime.

    Args:
        model_path: the .onnx file, or a loaded ``onnx.ModelProto`` (an in-memory model:
            the export, rewrite and int8 checks compare one before writing it).
        device: ``"cpu"`` (CPU execution provider, intra-op threads = available cores,
            full graph optimisation), or ``"cuda"`` / ``"cuda:N"`` (the CUDA execution
            provider's ``device_id`` N, 0 by default; needs onnxruntime-gpu).
        threads: intra-op threads; default: :func:`available_cores`.
        spin: whether idle intra-op threads spin-wait for work (ONNX Runtime's default,
            fastest when the engine has the cores to itself); False where other threads
            share the cores (a server's HTTP layer): ``session.intra_op.allow_spinning``.
    """

    name = "onnxruntime"
    requires = "onnxruntime"
    #: ``InferenceSession.run`` is thread-safe (ONNX Runtime's threading documentation).
    concurrent_infer = True

    @classmethod
    def from_file(cls, path, spec, device, options):
        """See :meth:`infer.base.Runner.from_file`."""
        return cls(path, str(device), options.threads, options.spin)

    def __init__(self, model_path, device: str = "cpu", threads: int | None = None,
                 spin: bool = True):
        super().__init__()
        parsed = parse_device(device)
        if parsed.kind not in PROVIDERS:
            raise ToolchainError(f"device {device!r}: ONNX Runtime runs on cpu or cuda[:N]")
        #: the serialised model of an in-memory ModelProto, else None (then model_path).
        self._model_bytes = None
        if hasattr(model_path, "SerializeToString"):
            self._model_bytes = model_path.SerializeToString()
            model_path = f"<in-memory {model_path.graph.name or 'ONNX'} model>"
        self.model_path = Path(model_path)
        self._device = parsed
        self.threads = threads or available_cores()
        self.spin = spin
        self.session = None

    @property
    def device(self) -> str:
        """The device, spelled as ``infer.device`` spells it (``cpu``, ``cuda``, ``cuda:N``)."""
        return str(self._device)

    def _load(self) -> None:
        import onnxruntime as ort

        if self._model_bytes is None and not self.model_path.is_file():
            raise ToolchainError(f"{self.model_path}: no such ONNX model")
        provider = PROVIDERS[self._device.kind]
        if provider not in ort.get_available_providers():
            raise ToolchainError(
                f"{provider} is not available in this onnxruntime "
                f"({ort.get_available_providers()});"
                " install onnxruntime-gpu matching your CUDA for --device cuda"
            )
        # (name, options) is ONNX Runtime's way to give a provider options: the GPU's index
        chosen = ((provider, {"device_id": self._device.ordinal})
                  if self._device.kind == "cuda" else provider)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.engine_errors = ort_errors()
        try:
            self.session = ort.InferenceSession(self._model_bytes or str(self.model_path),
                                                options, providers=[chosen])
        except self.engine_errors as exc:
            raise ToolchainError(f"{self.model_path}: ONNX Runtime cannot load it ({exc})") from exc
        self._outputs = [o.name for o in self.session.get_outputs()]

    def input_specs(self) -> list[InputSpec]:
        return [
            InputSpec(
                i.name,
                np.dtype(_DTYPES.get(i.type, np.float32)),
                tuple(d if isinstance(d, int) else None for d in i.shape),
            )
            for i in self.session.get_inputs()
        ]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._timed(self.session.run, self._outputs, feed)
        return dict(zip(self._outputs, outputs))

    def _close(self) -> None:
        self.session = None
