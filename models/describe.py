"""What a model file is: its backend (by suffix) and its model description, without an engine.

Reading a description needs only the files ``convert`` writes (ONNX metadata, the .om's
sidecar JSON), so preprocessing can size its inputs for a model without importing any
inference engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.errors import ToolchainError
from models.det_spec import Description, detector_spec_from_metadata
from models.registry import spec_for_arch
from models.sidecar import read_sidecar
from models.spec import METADATA_PREFIX, ModelSpec

log = logging.getLogger(__name__)

#: Model file suffix -> backend name (a key of ``infer.BACKENDS``).
SUFFIXES = {".onnx": "onnxruntime", ".om": "ais_bench", ".pth": "torch", ".pt": "torch"}


def backend_of(path: str | Path) -> str:
    """The backend name for a model file, by suffix.

    Raises:
        ToolchainError: an unknown suffix (the known ones are listed).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ToolchainError(
            f"{path}: unknown model file type {suffix or '(none)'!r}; known: {', '.join(SUFFIXES)}"
        )
    return SUFFIXES[suffix]


def describe(
    path: str | Path,
    arch: str | None = None,
    sidecar: str | Path | None = None,
    fallback: ModelSpec | None = None,
) -> Description:
    """The model description of a model file, without loading an engine: a recogniser's
    :class:`ModelSpec`, or a detector's ``DetectorSpec`` (for a detector's ONNX file or .om).

    Args:
        path: ``.onnx``, ``.om`` (with its sidecar), ``.json`` (an .om's sidecar), or
            ``.pth``/``.pt`` (needs ``arch``, unless it carries its description, as the
            checkpoints ``train`` writes do).
        arch: the architecture, for checkpoints (and ONNX files exported elsewhere, which
            carry no description).
        sidecar: the .om's sidecar JSON (default: beside the .om).
        fallback: the description to use for an ONNX file that carries none (e.g. the one
            its inputs were preprocessed with), when no ``arch`` is given.

    Raises:
        ToolchainError: the file is missing or unreadable, or carries no description and
            neither ``arch`` nor ``fallback`` was given.
    """
    path = Path(path)
    if not path.exists():
        raise ToolchainError(f"{path}: no such model file")
    if path.suffix.lower() == ".json":
        return read_sidecar(path.with_suffix(".om"), path)[1]
    backend = backend_of(path)
    if backend == "ais_bench":
        return read_sidecar(path, Path(sidecar) if sidecar else None)[1]
    if backend == "onnxruntime":
        from models.onnx_file import load_onnx

        model = load_onnx(path, load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        detector = detector_spec_from_metadata(props, str(path))
        if detector is not None:
            return detector
        if (
            arch is None
            and fallback is not None
            and not any(p.key.startswith(METADATA_PREFIX) for p in model.metadata_props)
        ):
            log.warning("%s carries no model description; using %s's", path, fallback.arch)
            return fallback
        if arch is not None and not any(
            p.key.startswith(METADATA_PREFIX) for p in model.metadata_props
        ):
            return spec_for_arch(arch)
        return ModelSpec.from_onnx(model, str(path))
    if arch is None:
        from models.checkpoint import read_description

        described = read_description(path)
        if described is None:
            raise ToolchainError(f"{path}: a checkpoint does not say which model it is; give "
                                 "its architecture (--arch)")
        return described
    return spec_for_arch(arch)
