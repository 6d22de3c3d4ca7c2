"""Load ONNX files with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import onnx

from convert.errors import ToolchainError


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model.

    Raises:
        ToolchainError: the file is missing or is not a readable ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base
        raise ToolchainError(f"{path}: not a readable ONNX model ({exc})") from exc


def cpu_session(model: str | Path | onnx.ModelProto):
    """An ONNX Runtime session on the CPU provider with default options.

    Args:
        model: an ONNX file or a loaded ``onnx.ModelProto``.

    Returns:
        ``onnxruntime.InferenceSession`` (onnxruntime is imported here, on first use).
    """
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])
