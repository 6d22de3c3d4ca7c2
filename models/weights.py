"""Fetch public model weights into a local cache (never committed).

Every architecture of ``models.registry`` with public weights can be fetched:
    ``nano-ocr``: the checkpoint ``nano_ocr/model/nano_ocr_ftr.pth`` of the ``nano-ocr==0.1.0``
    wheel (MIT), for ``convert.pth2onnx``.
    ``ppocr-v4-det``: ``ch_PP-OCRv4_det_infer.onnx`` of the same wheel, the PP-OCRv4 DB text
    detector (input ``x`` float32 [N, 3, H, W], H and W multiples of 32; output the text
    probability map [N, 1, H, W]), copied with its ``models.det_spec.DetectorSpec``.
    ``ppocr-v4-rec``: ``ch_PP-OCRv4_rec_infer.onnx`` of the ``rapidocr-onnxruntime==1.4.4``
    wheel (Apache-2.0). The cached file is a copy carrying this project's model description
    in its ONNX metadata (charset from the model's ``character`` key plus a space, blank 0,
    input ``x`` [N, 3, 48, W] BGR, probabilities [N, W // 8, 6625]), so every later tool
    takes it without flags.
    ``ppocr-v6-rec``, ``ppocr-v6-det``: PaddleOCR's PP-OCRv6 small recogniser
    (``PP-OCRv6_rec_small.onnx``: probabilities [N, W // 8, 18710]) and DB detector
    (``PP-OCRv6_det_small.onnx``) of the ``rapidocr==3.10.0`` wheel (Apache-2.0; the digests
    are those of its ``MODEL_LICENSES.md``), described as PP-OCRv4's are.
    ``ppocr-cls``: the text-direction classifier ``ch_ppocr_mobile_v2.0_cls_mobile.onnx`` of
    the same wheel (input ``x`` [N, 3, 48, 192], probabilities [N, 2] over "0" and "180"
    degrees), with its ``models.cls_spec.ClassifierSpec``.

The wheel is downloaded with ``pip download --no-deps`` (installing it would pull its
dependencies), the member is extracted and its sha256 checked. A cached file that is whole
is reused. ``path NAME`` prints where the file is (or would be).

The cache is ``$CRNN_WEIGHTS_DIR``, else ``.cache/weights`` in the repository.

Example:
    python -m models.weights fetch nano-ocr
    python -m models.weights fetch ppocr-v4-rec
    python -m models.weights fetch ppocr-v4-det
    python -m models.weights fetch ppocr-v6-rec
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file
from models.registry import ARCHS, CLASSIFIERS, DETECTORS, WeightSource, arch_entry

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The weights cache folder (``$CRNN_WEIGHTS_DIR`` or ``<repo>/.cache/weights``)."""
    return Path(os.environ.get("CRNN_WEIGHTS_DIR", REPO_ROOT / ".cache" / "weights"))


def _entry(name: str):
    """The registry entry ``name``: a detector, a classifier, else a recogniser."""
    return DETECTORS.get(name) or CLASSIFIERS.get(name) or arch_entry(name)


def _source(name: str) -> WeightSource:
    source = _entry(name).weights
    if source is None:
        raise ToolchainError(f"{name} has no public weights; known: {', '.join(fetchable())}")
    return source


def fetchable() -> list[str]:
    """Names of the architectures whose weights can be fetched."""
    entries = [*ARCHS.values(), *DETECTORS.values(), *CLASSIFIERS.values()]
    return [entry.name for entry in entries if entry.weights is not None]


def weights_path(name: str) -> Path:
    """Where the weights of ``name`` live in the cache (whether or not fetched yet)."""
    return cache_dir() / _source(name).filename


#: Models whose int8 copy holds their accuracy budget (docs/results/quantization.md), with the
#: command that builds it into the cache: post-training quantisation where that holds the
#: budget, quantisation-aware training where it does not. The pipeline and the service use the
#: copy once it is built.
INT8_COPIES = {
    "ppocr-v6-det": "python -m convert.quantize ppocr-v6-det",
    "ppocr-v6-rec": "python -m convert.quantize ppocr-v6-rec",
    "ppocr-v4-rec": "python -m train.qat ppocr-v4-rec",
}


def int8_path(name: str) -> Path:
    """Where the int8 copy of ``name`` lives in the cache, built or not.

    Raises:
        ToolchainError: ``name`` has no int8 copy (:data:`INT8_COPIES`).
    """
    if name not in INT8_COPIES:
        raise ToolchainError(f"{name} has no int8 copy; models with one: {', '.join(INT8_COPIES)}")
    fp32 = weights_path(name)
    return fp32.with_name(f"{fp32.stem}_int8.onnx")


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_member(source: WeightSource, target: Path) -> None:
    """``pip download`` the wheel, extract the member to ``target`` and check its digest."""
    spec = f"{source.package}=={source.version}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        log.info("running: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-3:]
            raise ToolchainError(
                f"pip download {spec} failed ({proc.returncode}): {' | '.join(tail)}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ToolchainError(f"pip download {spec} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if source.member not in wheel.namelist():
                raise ToolchainError(f"{wheels[0].name} has no {source.member}")
            target.write_bytes(wheel.read(source.member))
    digest = sha256_of(target)
    if digest != source.sha256:
        target.unlink()
        raise ToolchainError(
            f"{source.member} from {spec} has sha256 {digest}, expected {source.sha256}"
        )


def describe_ppocr_rec(model_path: Path, output: Path, name: str = "ppocr-v4-rec") -> None:
    """Write a copy of a PP-OCR recogniser ONNX file carrying the description of registry
    entry ``name``.

    The charset is the model's ``character`` metadata (one character per line) with a space
    appended last, blank 0 (PaddleOCR ``CTCLabelDecode`` with ``use_space_char``).

    Raises:
        ToolchainError: the file has no ``character`` metadata, or its output's class axis
            does not match the charset.
    """
    from models.charset import Charset
    from models.onnx_file import load_onnx

    model = load_onnx(model_path)
    props = {p.key: p.value for p in model.metadata_props}
    if "character" not in props:
        raise ToolchainError(f"{model_path}: no 'character' metadata (not a PP-OCR recogniser?)")
    charset = Charset.from_lines([*props["character"].splitlines(), " "])
    spec = arch_entry(name).spec.replace(alphabet=charset.characters)
    classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    if classes != spec.num_classes:
        raise ToolchainError(
            f"{model_path}: {classes} output classes for a charset of "
            f"{spec.num_classes - 1} characters + blank"
        )
    save_described(model, spec, output)


def save_described(model, spec, output: Path) -> None:
    """Save a loaded ``onnx.ModelProto`` to ``output`` with ``spec``'s description added to
    (or replacing its keys in) the model's ``metadata_props``."""
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    props.update(spec.to_metadata())
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(output))


def describe_tensors(model_path: Path, output: Path, name: str) -> None:
    """Write a copy of a detector's or classifier's ONNX file carrying the description of
    registry entry ``name`` (``DETECTORS`` or ``CLASSIFIERS``).

    Raises:
        ToolchainError: the file's input or output is not the one the description names, or
            a classifier's class axis does not match its labels.
    """
    from models.onnx_file import load_onnx

    model = load_onnx(model_path)
    spec = _entry(name).spec
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [spec.input_name] or outputs != [spec.output_name]:
        raise ToolchainError(f"{model_path}: tensors {inputs} -> {outputs}, expected "
                             f"[{spec.input_name!r}] -> [{spec.output_name!r}]")
    if name in CLASSIFIERS:
        classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        if classes != spec.num_classes:
            raise ToolchainError(f"{model_path}: {classes} output classes for the labels "
                                 f"{list(spec.labels)}")
    save_described(model, spec, output)


#: Models whose cached file is a copy carrying our description, and the function writing it.
_DESCRIBERS = {"ppocr-v4-rec": describe_ppocr_rec, "ppocr-v6-rec": describe_ppocr_rec,
               "ppocr-v4-det": describe_tensors, "ppocr-v6-det": describe_tensors,
               "ppocr-cls": describe_tensors}


def _is_cached_copy(target: Path, source: WeightSource, *, described: bool) -> bool:
    """Whether ``target`` is what :func:`fetch` writes for ``source``: the member itself (same
    sha256), or for a described model an ONNX file carrying this toolchain's description."""
    if not described:
        return sha256_of(target) == source.sha256
    from models.onnx_file import written_by_toolchain  # onnx, only for described models

    return written_by_toolchain(target)


def fetch(name: str) -> Path:
    """Download (if needed) and verify the weights of ``name``; return the cached path.

    Raises:
        ToolchainError: pip fails, the wheel lacks the file, or the digest differs; or the
            cache path holds a file :func:`fetch` did not write (it is neither used nor
            replaced).
    """
    source = _source(name)
    target = weights_path(name)
    describer = _DESCRIBERS.get(name)
    # A described copy was renamed into place whole and carries our description; an unchanged
    # member must keep its digest.
    if target.is_file() and _is_cached_copy(target, source, described=describer is not None):
        log.info("cached: %s", target)
        return target
    # Any other file there (another digest, or no description) is neither used nor replaced.
    check_output_file(target, "the weights cache ($CRNN_WEIGHTS_DIR)", tool="models.weights")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        member, partial = Path(tmp) / "member", Path(tmp) / target.name
        _download_member(source, member)
        if describer is not None:
            describer(member, partial, name)
        else:
            member.replace(partial)
        partial.replace(target)  # appears whole or not at all
    log.info(
        "fetched %s (%s==%s, %s licence) -> %s",
        source.member,
        source.package,
        source.version,
        source.license,
        target,
    )
    return target


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("action", choices=("fetch", "path"))
    parser.add_argument("name", choices=fetchable())
    return parser


def _run(args) -> int:
    print(fetch(args.name) if args.action == "fetch" else weights_path(args.name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
