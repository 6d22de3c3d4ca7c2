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
from models.cls_spec import classifier_spec_from_metadata
from models.det_spec import Description, detector_spec_from_metadata
from models.registry import spec_for_arch
from models.sidecar import read_sidecar
from models.spec import METADATA_PREFIX, ModelSpec

log = logging.getLogger(__name__)


def describe_onnx(path: Path, arch: str | None = None, sidecar: Path | None = None,
                  fallback: ModelSpec | None = None) -> Description:
    """The description in an ONNX file's ``metadata_props``: a detector's ``DetectorSpec``,
    a classifier's ``ClassifierSpec``, else a recogniser's :class:`ModelSpec`. A file
    exported elsewhere carries none: then ``arch``'s registry entry, else ``fallback``
    (with a warning). ``sidecar`` is unused.

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
    classifier = classifier_spec_from_metadata(props, str(path))
    if classifier is not None:
        return classifier
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


def describe_classifier(path: Path, labels: tuple[str, ...], arch: str | None = None
                        ) -> Description:
    """The description of an image classifier ONNX file given its labels (a label file).

    A file carrying a classifier description keeps it, with these labels. A file from
    elsewhere (e.g. ``torch.onnx.export`` of an ImageNet-style classifier) gets the usual
    conventions of such models: its one input ``[N, 3, H, W]`` with a static height and width
    (the input size), RGB, ImageNet normalisation, resized to that size whatever the image's
    aspect ratio; its first output ``[N, classes]``, probabilities when the graph ends in a
    Softmax, else logits.

    Raises:
        ToolchainError: not ONNX; another kind of model; more than one input, an input that
            is not ``[N, 1 or 3, H, W]`` with static H and W, or an output whose class count
            is not the number of labels.
    """
    from models.cls_spec import IMAGENET_MEAN, IMAGENET_STD, ClassifierSpec
    from models.onnx_file import load_onnx

    model = load_onnx(path, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    described = classifier_spec_from_metadata(props, str(path))
    if described is not None:
        if len(labels) != described.num_classes:
            raise ToolchainError(f"{path}: {len(labels)} labels for a classifier of "
                                 f"{described.num_classes} classes")
        return described.replace(labels=labels)
    if any(key.startswith(METADATA_PREFIX) for key in props) or detector_spec_from_metadata(
            props, str(path)) is not None:
        raise ToolchainError(f"{path}: carries a recogniser's or detector's description, not a "
                             "classifier's; --labels is for image classifiers")
    initialisers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise ToolchainError(f"{path}: an image classifier has one input, this one has "
                             f"{len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (1, 3) or not dims[2] or not dims[3]:
        raise ToolchainError(f"{path}: input {inputs[0].name!r} has shape {dims}; an image "
                             "classifier's is [N, 1 or 3, H, W] with a static H and W")
    output = model.graph.output[0]
    out_dims = [d.dim_value if d.HasField("dim_value") else None
                for d in output.type.tensor_type.shape.dim]
    if len(out_dims) != 2 or out_dims[1] not in (None, len(labels)):
        raise ToolchainError(f"{path}: output {output.name!r} has shape {out_dims}, not "
                             f"[N, {len(labels)}] for the {len(labels)} labels")
    producer = next((n for n in model.graph.node if output.name in n.output), None)
    grey = dims[1] == 1
    return ClassifierSpec(
        arch=arch or path.stem, labels=labels, input_name=inputs[0].name,
        output_name=output.name, height=dims[2], width=dims[3],
        channel_order="grey" if grey else "rgb",
        mean=(0.5,) if grey else IMAGENET_MEAN, std=(0.5,) if grey else IMAGENET_STD,
        resize="stretch",
        output_kind="probabilities" if producer is not None and producer.op_type == "Softmax"
        else "logits")
