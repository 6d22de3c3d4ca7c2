"""The ONNX file format's owner: loading with errors that name the file, the description in
its metadata, and whether this toolchain wrote a given file."""

from __future__ import annotations

from pathlib import Path

import onnx

from common.errors import ToolchainError
from common.outputs import check_output_file
from models.cls_spec import CLS_METADATA_PREFIX
from models.det_spec import DET_METADATA_PREFIX
from models.spec import METADATA_PREFIX, QUANTIZATION_METADATA_KEY, ModelSpec


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


def read_onnx_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` stored in an ONNX model's ``metadata_props``.

    Raises:
        ToolchainError: the file is missing, not ONNX, or carries no description.
    """
    return ModelSpec.from_onnx(load_onnx(path, load_external_data=False), str(path))


def written_by_toolchain(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX model this toolchain wrote: one carrying a recogniser,
    detector or classifier description, or int8 settings, in its ``metadata_props`` (what
    ``convert.pth2onnx``, ``convert.fix``, ``convert.quantize`` and ``models.weights`` write;
    a model from elsewhere has none of these keys). An unreadable file is not one."""
    try:
        model = load_onnx(path, load_external_data=False)
    except ToolchainError:
        return False
    prefixes = (METADATA_PREFIX, DET_METADATA_PREFIX, CLS_METADATA_PREFIX,
                QUANTIZATION_METADATA_KEY)
    return any(p.key.startswith(prefixes) for p in model.metadata_props)


def check_model_output(path: str | Path, source: str | Path | None = None) -> Path:
    """:func:`common.outputs.check_output_file` for a model a tool writes: an existing file
    there is replaced only when it is a model this toolchain wrote (:func:`written_by_toolchain`),
    and never when it is the model the tool reads (``source``), which would be lost.

    Raises:
        ToolchainError: one line naming the path (see ``check_output_file``).
    """
    if source is not None and Path(path).resolve() == Path(source).resolve():
        raise ToolchainError(f"{path}: is the input model; the output must be another file "
                             "(nothing was changed)")
    return check_output_file(path, "the output", ours=written_by_toolchain, tool="this toolchain")
