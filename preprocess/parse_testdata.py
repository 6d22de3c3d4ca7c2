"""Turn an IIIT5K-style lmdb test set into model inputs (.npy), a manifest and label.txt.

Every index 1..num-samples is accounted for: decoded (any Pillow format, converted to the
model's colours: grey, RGB or BGR), resized to the model's height with its filter and width
policy, normalised as the model expects, and written; or recorded in ``failed`` with its
reason. Nothing is dropped silently or replaced. The model description comes from
``--model`` (an .onnx from convert.pth2onnx or models.weights, an .om with its sidecar, or
the sidecar .json) or ``--arch``; width options and ``--tall-crops`` override it. A crop the
description reads turned (``tall_crops="turn"``: at least ``tall_ratio`` times as high as
wide) is written three times, as it is and turned 90 degrees both ways; the manifest lists
each reading with its ``turn``, and ``eval.postprocess`` keeps the most confident.

Layouts:
    bucketed (default): ``batch_00000.npy``... float32 ``[B, C, H, W]``, samples sorted by
        width; with ``--max-pad 0`` each batch holds one width (no padding, so batched
        results equal batch-1 results); a larger ``--max-pad`` allows mixed widths, right-
        padded with normalised 0.0, the value the first convolution pads with.
    per-image: ``test_{index}.npy`` float32 ``[1, C, H, W]`` (the ModelZoo layout).

Also written: ``manifest.json`` (model description, policy, ``samples`` and ``failed``) and
the ModelZoo ``label.txt`` (``test_{index}.npy:label``). Output goes to a temporary folder
beside the target and is renamed into place at the end. The ModelZoo guide's equivalent is
``python3 parse_testdata.py --test_dir ./IIIT5K_lmdb --output_npy input_npy``; those
spellings are accepted beside ``--test-dir`` and ``--output-npy``.

Example:
    python -m preprocess.parse_testdata --test-dir ../shared/data/IIIT5K_3000 \\
        --output-npy work/inputs --model nano.onnx
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file, current_umask
from models.backends import describe
from models.registry import ARCHS, spec_for_arch
from models.spec import TALL_CROPS, WIDTH_POLICIES, ModelSpec
from preprocess.batching import PAD_VALUE, batch_inputs
from preprocess.image import normalise
from preprocess.manifest import MANIFEST_VERSION, read_manifest, write_manifest
from preprocess.stream import decode_all, missing_range

log = logging.getLogger(__name__)

LAYOUTS = ("bucketed", "per-image")
#: The file that marks a folder as this tool's output (with the manifest's ``output_id``).
MARKER = ".parse_testdata-output.json"
TOOL = "preprocess.parse_testdata"

def preprocessing_policy(spec: ModelSpec, layout: str, batch_size: int,
                         max_pad: int) -> dict[str, object]:
    """The preprocessing settings a manifest or report records (also ``eval.postprocess``)."""
    return {"width_policy": spec.width_policy, "width": spec.width, "min_width": spec.min_width,
            "max_width": spec.max_width, "width_step": spec.width_step, "resample": spec.resample,
            "layout": layout, "batch_size": batch_size, "max_pad": max_pad,
            "pad_value": PAD_VALUE}


def failed_count(failed: Sequence[dict]) -> int:
    """Samples a failure list accounts for (a range record counts its ``count``)."""
    return sum(int(f.get("count", 1)) for f in failed)


def owns(output: Path) -> bool:
    """Whether ``output`` is a folder this tool wrote: its marker and its manifest carry the
    same output id (a file name alone, which anyone can have, is not enough)."""
    try:
        marker = json.loads((output / MARKER).read_text())
        manifest = read_manifest(output)
    except (OSError, ValueError, ToolchainError):
        return False
    return (isinstance(marker, dict) and isinstance(manifest, dict) and marker.get("tool") == TOOL
            and marker.get("output_id") is not None
            and marker.get("output_id") == manifest.get("output_id"))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that would replace what this tool did not write.

    Raises:
        ToolchainError: ``output`` is a file, a non-empty folder this tool did not write,
            or an earlier output of this tool without ``overwrite``.
    """
    if not output.exists():
        check_output_file(output, "--output-npy")  # its parent can be made and written in
        return
    if not output.is_dir():
        raise ToolchainError(f"{output}: exists and is not a folder; choose another --output-npy")
    if not any(output.iterdir()):
        return
    if not owns(output):
        raise ToolchainError(f"{output}: not empty and not written by parse_testdata; nothing "
                             "was changed; choose another --output-npy")
    if not overwrite:
        raise ToolchainError(f"{output}: holds an earlier parse_testdata output; pass "
                             "--overwrite to replace it")


def write_inputs(test_dir: Path, output: Path, spec: ModelSpec, layout: str = "bucketed",
                 batch_size: int = 16, max_pad: int = 0, workers: int = 1,
                 progress: bool = False, overwrite: bool = False) -> dict[str, object]:
    """Read every sample of ``test_dir`` and write the model inputs into ``output``.

    Returns:
        The manifest (also written as ``output/manifest.json``).

    Raises:
        ToolchainError: ``test_dir`` is not an lmdb, or ``output`` may not be written
            (:func:`check_output`).
    """
    if layout not in LAYOUTS:
        raise ToolchainError(f"layout {layout!r} is unknown; use one of {LAYOUTS}")
    check_output(output, overwrite)
    found, results = decode_all(test_dir, spec, workers, turns=True)
    count = found.num_samples
    # One entry per reading, in index order, each index's readings in TURNS order: the order
    # the one-process path fills its batches in, so both batch the same rows together.
    samples: list[dict] = []
    pixels: list[np.ndarray] = []
    missing = missing_range(found)
    failed: list[dict] = [missing] if missing else []
    with contextlib.closing(results):  # the decoding workers stop here, whatever happens
        decoded = list(tqdm(results, total=found.readable, unit="img", desc="decode",
                            disable=None if progress else True))
    for index, label, image, size, reason, turn in decoded:
        if reason is not None:
            failed.append({"index": index, "reason": reason})
            continue
        samples.append({"index": index, "label": label, "width": int(image.shape[1]),
                        "size": list(size), **({"turn": turn} if turn else {})})
        pixels.append(image)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    output_id = uuid.uuid4().hex
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the output follows the umask
        (staging / MARKER).write_text(json.dumps({"tool": TOOL, "output_id": output_id}))
        if layout == "per-image":
            for sample, image in zip(samples, pixels):
                name = per_image_name(sample["index"], sample.get("turn", 0))
                np.save(staging / name, normalise(image, spec)[None])
                sample.update(file=name, row=0)
        else:
            planned = batch_inputs(pixels, spec, batch_size, max_pad)
            for number, (positions, batch) in enumerate(planned):
                name = f"batch_{number:05d}.npy"
                np.save(staging / name, batch)
                for row, position in enumerate(positions):
                    samples[position].update(file=name, row=row)
        manifest = {
            "version": MANIFEST_VERSION,
            "source": str(Path(test_dir).resolve()),
            "num_samples": count,
            "output_id": output_id,
            "entries_beyond_num_samples": found.beyond,
            "synthetic": found.synthetic,
            "model": spec.to_dict(),
            "policy": preprocessing_policy(spec, layout, batch_size, max_pad),
            "samples": samples,
            "failed": sorted(failed, key=lambda f: f["index"]),
        }
        write_manifest(staging, manifest)
        if layout == "per-image":  # ModelZoo's label.txt names the test_<index>.npy files
            (staging / "label.txt").write_text(
                "".join(f"test_{s['index']}.npy:{s['label']}\n" for s in samples
                        if not s.get("turn")), encoding="utf-8")
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def per_image_name(index: int, turn: int) -> str:
    """The per-image layout's file of one reading: ``test_{index}.npy`` (ModelZoo's name) for
    the upright reading, ``turned_{index}_ccw.npy`` / ``_cw.npy`` for a tall crop's turns
    (named apart, so ModelZoo's scripts, which read label.txt, see the upright ones only)."""
    if turn == 0:
        return f"test_{index}.npy"
    return f"turned_{index}_{'ccw' if turn == 1 else 'cw'}.npy"


def _replace(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``, replacing an earlier output once the new one is whole."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        try:
            staging.rename(output)
        except BaseException:  # Ctrl-C or a failed rename: the earlier output goes back
            old.rename(output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


def resolve_spec(model: Path | None, arch: str | None, **overrides) -> ModelSpec:
    """The model description from a model file or an architecture name, overrides applied.

    ``model`` is an .onnx, an .om (its sidecar beside it) or a sidecar .json; with ``arch``
    too, ``arch`` describes a checkpoint or an ONNX file that carries no description.

    Raises:
        ToolchainError: neither given, or invalid overrides.
    """
    if model is None and arch is None:
        raise ToolchainError("give --model (.onnx, .om or its sidecar .json) or --arch")
    spec = describe(model, arch) if model is not None else spec_for_arch(arch)
    return spec.replace(**{k: v for k, v in overrides.items() if v is not None})


def add_width_arguments(parser) -> None:
    """The preprocessing options that override a model description (the width policy and
    ``--tall-crops``; shared with eval.postprocess)."""
    parser.add_argument("--width-policy", choices=WIDTH_POLICIES, help="default: the model's")
    parser.add_argument("--width", type=int, help="fixed-policy width (default: the model's)")
    parser.add_argument("--min-width", type=int, help="keep-ratio clamp (default: the model's)")
    parser.add_argument("--max-width", type=int, help="keep-ratio clamp (default: the model's)")
    parser.add_argument("--width-step", type=int, help="keep-ratio rounding (default: the model's)")
    parser.add_argument("--tall-crops", choices=TALL_CROPS,
                        help="keep: read every crop as it is; turn: read crops at least 1.5 "
                             "times as high as wide also turned 90 degrees both ways, keeping "
                             "the most confident reading (default: the model's)")


def width_overrides(args) -> dict[str, object]:
    """The description fields :func:`add_width_arguments`'s options set (None: not given)."""
    return {name: getattr(args, name) for name in
            ("width_policy", "width", "min_width", "max_width", "width_step", "tall_crops")}


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument(
        "--test-dir", "--test_dir", dest="test_dir", type=Path, required=True, help="lmdb folder"
    )
    parser.add_argument(
        "--output-npy",
        "--output_npy",
        dest="output_npy",
        type=Path,
        required=True,
        help="output folder",
    )
    parser.add_argument(
        "--model", type=Path, help="model file carrying the description (.onnx, .om, sidecar .json)"
    )
    parser.add_argument(
        "--arch",
        choices=list(ARCHS),
        help="architecture, instead of --model or for a model without a description",
    )
    parser.add_argument("--layout", default="bucketed", choices=LAYOUTS)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples per batch file (bucketed); 16 is the ModelZoo range maximum",
    )
    parser.add_argument(
        "--max-pad",
        type=int,
        default=0,
        help="most pixels of right padding per sample in a batch (0: equal widths only)",
    )
    add_width_arguments(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="decoding threads (1: in the main thread)",
    )
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any sample fails")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output of this tool (never anything else)")
    return parser


def _run(args) -> int:
    if args.batch_size < 1 or args.max_pad < 0:
        raise ToolchainError("--batch-size must be >= 1 and --max-pad >= 0")
    spec = resolve_spec(args.model, args.arch, **width_overrides(args))
    start = time.perf_counter()
    manifest = write_inputs(
        args.test_dir,
        args.output_npy,
        spec,
        args.layout,
        args.batch_size,
        args.max_pad,
        args.workers,
        progress=True,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    written = len({s["index"] for s in manifest["samples"]})
    turned = sum(1 for s in manifest["samples"] if s.get("turn"))
    failed = manifest["failed"]
    for failure in failed[:10]:
        where = (f"samples {failure['index']}..{failure['last']}" if "last" in failure
                 else f"sample {failure['index']}")
        log.warning("%s failed: %s", where, failure["reason"])
    files = len({s["file"] for s in manifest["samples"]})
    print(
        f"read {manifest['num_samples']}, written {written}"
        f"{f' (+{turned} turned readings of {turned // 2} tall crops)' if turned else ''}, "
        f"failed {failed_count(failed)} ({args.layout}, {files} files, {spec.width_policy} "
        f"width) in {elapsed:.2f} s "
        f"-> {args.output_npy}"
    )
    if written == 0 or (args.strict and failed):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
