"""Read a model description from each model file format, without an engine.

One reader per format, each with the signature the backend table (``models.backends``) takes:
``reader(path, arch, sidecar, fallback) -> ModelSpec | DetectorSpec``. Reading a description
needs only the files ``convert`` writes (ONNX metadata, the .om's sidecar JSON, the
checkpoints ``train`` writes), so preprocessing can size its inputs for a model without
importing any inference engine.
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


def describe_onnx(path: Path, arch: str | None = None, sidecar: Path | None = None,
                  fallback: ModelSpec | None = None) -> Description:
    """The description in an ONNX file's ``metadata_props``: a detector's ``DetectorSpec``,
    else a recogniser's :class:`ModelSpec`. A file exported elsewhere carries none: then
    ``arch``'s registry entry, else ``fallback`` (with a warning). ``sidecar`` is unused.

    Raises:
        ToolchainError: the file is not ONNX, or carries no description and neither ``arch``
            nor ``fallback`` was given.
    """
    from models.onnx_file import load_onnx  # onnx, only for ONNX files

    model = load_onnx(path, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    detector = detector_spec_from_metadata(props, str(path))
    if detector is not None:
        return detector
    described = any(key.startswith(METADATA_PREFIX) for key in props)
    if not described and arch is not None:
        return spec_for_arch(arch)
    if not described and fallback is not None:
        log.warning("%s carries no model description; using %s's", path, fallback.arch)
        return fallback
    return ModelSpec.from_onnx(model, str(path))


def describe_om(path: Path, arch: str | None = None, sidecar: Path | None = None,
                fallback: ModelSpec | None = None) -> Description:
    """The description in an .om's sidecar JSON (``sidecar``, default beside the .om).
    ``arch`` and ``fallback`` are unused.

    Raises:
        ToolchainError: see :func:`models.sidecar.read_sidecar`.
    """
    return read_sidecar(path, sidecar)[1]


def describe_checkpoint(path: Path, arch: str | None = None, sidecar: Path | None = None,
                        fallback: ModelSpec | None = None) -> Description:
    """``arch``'s registry entry, else the description a checkpoint carries (the ones
    ``train`` writes). ``sidecar`` and ``fallback`` are unused.

    Raises:
        ToolchainError: no ``arch`` and the checkpoint carries no description.
    """
    if arch is not None:
        return spec_for_arch(arch)
    from models.checkpoint import read_description  # torch, only for checkpoints

    described = read_description(path)
    if described is None:
        raise ToolchainError(f"{path}: a checkpoint does not say which model it is; give "
                             "its architecture (--arch)")
    return described
