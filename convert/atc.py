"""Build (and run, where CANN is installed) the ATC command for a dynamic-shape Ascend model.

Two ways to make the width dynamic:
    ``range`` (Ascend 310P, 910 and newer): ``--input_shape=imgs:1~16,1,32,32~320``, any
    batch and width inside the ranges at run time (ais_bench mode ``dymshape``).
    ``gears`` (Ascend 310, which has no range support): ``--input_shape=imgs:16,1,32,-1``
    with ``--dynamic_dims=32;64;...``: a fixed batch and a list of compiled widths; inputs
    are padded up to the next gear (ais_bench mode ``dymdims``).
``--mode auto`` picks ``gears`` for SoCs without range support and says so. The input's
name, channels and height, and the default width range, come from the model description in
the ONNX metadata; the plan is kept per input (:class:`ShapePlan`), so any
``[batch, channels, height, width]`` model builds: a recogniser (dynamic width), a DB
detector (dynamic height and width) or an image classifier (one input size, dynamic
batch). ATC appends
``_linux_<arch>`` to dynamic-shape model names; the produced .om is found either way, and a
sidecar JSON (same name, ``.json``) records the shape plan, the SoC, the ATC command and the
model description for ``eval.postprocess --om-path``. ``--input_shape_range`` is deprecated in
CANN; this tool uses ``--input_shape`` with ``~`` ranges.

Example:
    python -m convert.atc --model nano_fixed.onnx --output om/nano --soc_version Ascend310P3
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file
from models.cls_spec import ClassifierSpec, classifier_spec_from_metadata
from models.det_spec import DetectorSpec, detector_spec_from_metadata
from models.onnx_file import load_onnx
from models.sidecar import InputPlan, ShapePlan, om_built_here, sidecar_written_here, write_sidecar
from models.spec import ModelSpec, quantization_of

log = logging.getLogger(__name__)

MODES = ("auto", "range", "gears")
#: SoC versions whose ATC has no shape-range support (dynamic dims/gears only).
SOCS_WITHOUT_RANGE = frozenset({"Ascend310"})
MIN_GEARS, MAX_GEARS = 2, 100
SET_ENV_HINT = (
    "install the CANN toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh` "
    "(or your CANN install's set_env.sh) so that `atc` is on PATH"
)
_SOC_PATTERN = re.compile(r"^Ascend\d{3}[A-Za-z0-9]*$")


def supports_shape_range(soc_version: str) -> bool:
    """Whether ATC accepts ``~`` shape ranges for this SoC (all but :data:`SOCS_WITHOUT_RANGE`)."""
    return soc_version not in SOCS_WITHOUT_RANGE


def _resolve_mode(soc_version: str, mode: str, min_batch: int, max_batch: int) -> str:
    """Check the SoC, mode and batch range; ``"range"`` or ``"gears"`` (``auto`` resolved)."""
    if not _SOC_PATTERN.match(soc_version):
        raise ToolchainError(
            f"SoC version {soc_version!r} does not look like Ascend<NNN>[suffix], "
            "e.g. Ascend310P3 (see `npu-smi info`)"
        )
    if mode not in MODES:
        raise ToolchainError(f"mode {mode!r} is unknown; use one of {MODES}")
    if not 1 <= min_batch <= max_batch:
        raise ToolchainError(
            f"batch range {min_batch}~{max_batch} is invalid: need 1 <= min <= max"
        )
    if mode == "auto":
        mode = "range" if supports_shape_range(soc_version) else "gears"
        if mode == "gears":
            log.info("%s has no shape-range support: building gears instead", soc_version)
    elif mode == "range" and not supports_shape_range(soc_version):
        raise ToolchainError(f"{soc_version} has no shape-range support; use --mode gears")
    return mode


def plan_shape(
    soc_version: str,
    input_name: str,
    channels: int,
    height: int,
    mode: str = "auto",
    min_batch: int = 1,
    max_batch: int = 16,
    min_width: int = 32,
    max_width: int = 320,
    width_gears: Sequence[int] | None = None,
    min_accepted_width: int = 1,
) -> ShapePlan:
    """Validate the requested ranges for a ``[batch, channels, height, width]`` input and
    choose range or gear mode.

    Args:
        soc_version: e.g. ``"Ascend310P3"``.
        input_name, channels, height: the input, from the model description.
        mode: ``"auto"`` (range where the SoC supports it, else gears), ``"range"``, ``"gears"``.
        min_batch, max_batch: batch range; gears mode compiles ``max_batch``.
        min_width, max_width: width range in pixels.
        width_gears: explicit gears (gears mode); default: ``min_width`` to ``max_width``
            in steps of 16, ``max_width`` included.
        min_accepted_width: narrowest input the network accepts.

    Raises:
        ToolchainError: an unknown mode or SoC, min > max, a width below what the
            network accepts, ranges on a SoC without range support, or a gear count
            outside 2..100.
    """
    mode = _resolve_mode(soc_version, mode, min_batch, max_batch)
    if min_width > max_width:
        raise ToolchainError(f"width range {min_width}~{max_width} is invalid: min > max")
    if min_width < min_accepted_width:
        raise ToolchainError(
            f"min width {min_width} is below the network's minimum input width {min_accepted_width}"
        )
    if mode == "range":
        dims = ((min_batch, max_batch), channels, height, (min_width, max_width))
        return ShapePlan("range", (InputPlan(input_name, dims),))
    gears = sorted(set(width_gears)) if width_gears else _default_gears(min_width, max_width)
    if not MIN_GEARS <= len(gears) <= MAX_GEARS:
        raise ToolchainError(
            f"{len(gears)} width gears given; ATC needs {MIN_GEARS} to {MAX_GEARS}"
        )
    if gears[0] < min_accepted_width:
        raise ToolchainError(
            f"gear {gears[0]} is below the network's minimum input width {min_accepted_width}"
        )
    dims = (max_batch, channels, height, -1)
    return ShapePlan("gears", (InputPlan(input_name, dims),), tuple((g,) for g in gears))


def plan_detector_shape(
    soc_version: str,
    spec: DetectorSpec,
    mode: str = "auto",
    min_batch: int = 1,
    max_batch: int = 1,
    min_side: int | None = None,
    max_side: int | None = None,
    hw_gears: Sequence[tuple[int, int]] | None = None,
) -> ShapePlan:
    """The plan for a DB text detector's ``[batch, 3, H, W]`` input: H and W both dynamic.

    Range mode: ``x:1~B,3,min~max,min~max``. Gears mode: ``x:B,3,-1,-1`` with
    ``--dynamic_dims=H1,W1;H2,W2;...``; by default the sizes the detector's resize rule
    gives photos of 4:3, 16:9 and 1:1 in both orientations, plus the largest square, so
    every input fits a gear (the runner pads bottom and right up to it).

    Args:
        soc_version, mode, min_batch, max_batch: as :func:`plan_shape`.
        spec: the detector description (input name, resize rule, stride).
        min_side, max_side: H and W range in pixels; default: one stride to the largest
            side the resize rule gives (``limit_side_len`` for ``"max"``, else
            ``spec.max_side``).
        hw_gears: explicit ``(H, W)`` gears.

    Raises:
        ToolchainError: as :func:`plan_shape`, or a side that is not a multiple of the
            detector's stride.
    """
    low = min_side or spec.stride
    high = max_side or (spec.limit_side_len if spec.limit_type == "max" else spec.max_side)
    high = high // spec.stride * spec.stride
    for side in (low, high, *(v for g in hw_gears or () for v in g)):
        if side % spec.stride or side < spec.stride:
            raise ToolchainError(f"detector side {side} is not a positive multiple of its "
                                 f"stride {spec.stride}")
    if low > high:
        raise ToolchainError(f"side range {low}~{high} is invalid: min > max")
    if _resolve_mode(soc_version, mode, min_batch, max_batch) == "range":
        dims = ((min_batch, max_batch), 3, (low, high), (low, high))
        return ShapePlan("range", (InputPlan(spec.input_name, dims),))
    if hw_gears:
        gears = sorted(set(tuple(g) for g in hw_gears))
    else:
        sizes = {spec.input_size(w * 1000, h * 1000)[::-1]
                 for w, h in ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1))}
        sizes.add((high, high))
        gears = sorted((min(h, high), min(w, high)) for h, w in sizes)
    if not MIN_GEARS <= len(gears) <= MAX_GEARS:
        raise ToolchainError(f"{len(gears)} (H, W) gears given; ATC needs {MIN_GEARS} to "
                             f"{MAX_GEARS}")
    dims = (max_batch, 3, -1, -1)
    return ShapePlan("gears", (InputPlan(spec.input_name, dims),), tuple(gears))


def plan_classifier_shape(soc_version: str, spec: ClassifierSpec, mode: str = "auto",
                          min_batch: int = 1, max_batch: int = 16) -> ShapePlan:
    """The plan for an image classifier's ``[batch, C, H, W]`` input: one input size, a
    dynamic batch.

    Range mode: ``x:1~B,3,48,192``. Gears mode: ``x:-1,3,48,192`` with batch gears
    ``--dynamic_dims=1;2;4;...;B`` (powers of two up to the largest, which is included); the
    runner pads a batch up to the next gear and splits a larger one.

    Raises:
        ToolchainError: as :func:`plan_shape`.
    """
    dims_tail = (spec.channels, spec.height, spec.width)
    if _resolve_mode(soc_version, mode, min_batch, max_batch) == "range":
        return ShapePlan("range", (InputPlan(spec.input_name,
                                             ((min_batch, max_batch), *dims_tail)),))
    gears = sorted({min_batch, max_batch, *(1 << k for k in range(max_batch.bit_length())
                                             if min_batch <= 1 << k <= max_batch)})
    if len(gears) < MIN_GEARS:
        raise ToolchainError(f"batch {min_batch}~{max_batch} gives {len(gears)} gear; ATC needs "
                             f"{MIN_GEARS} to {MAX_GEARS}: widen the batch range")
    return ShapePlan("gears", (InputPlan(spec.input_name, (-1, *dims_tail)),),
                     tuple((g,) for g in gears))


def _default_gears(min_width: int, max_width: int, step: int = 16) -> list[int]:
    gears = list(range(min_width, max_width + 1, step))
    if gears[-1] != max_width:
        gears.append(max_width)
    return gears


def build_atc_command(
    model: str | Path,
    output: str | Path,
    soc_version: str,
    plan: ShapePlan,
    log_level: str = "error",
    precision_mode: str | None = None,
    atc: str = "atc",
) -> list[str]:
    """The ATC argv for ``model`` (a pure function: nothing is checked on disk).

    Returns:
        ``[atc, --model=..., --framework=5, --output=..., --input_format=ND,
        --input_shape=name:dims[;name:dims], (--dynamic_dims=g1;g2;...), --log=...,
        --soc_version=..., (--precision_mode=...)]``; ``--framework=5`` means ONNX, and a
        gear's values are comma-separated when several dimensions take them.
    """
    shapes = ";".join(f"{i.name}:{i.atc_dims()}" for i in plan.inputs)
    argv = [
        atc,
        f"--model={model}",
        "--framework=5",
        f"--output={output}",
        "--input_format=ND",
        f"--input_shape={shapes}",
    ]
    if plan.mode == "gears":
        argv.append("--dynamic_dims=" + ";".join(",".join(map(str, g)) for g in plan.gears))
    argv += [f"--log={log_level}", f"--soc_version={soc_version}"]
    if precision_mode:
        argv.append(f"--precision_mode={precision_mode}")
    return argv


def find_om(output: str | Path) -> Path:
    """The model ATC wrote for ``--output=output``: ``output.om`` or ``output_linux_<arch>.om``.

    Raises:
        ToolchainError: neither exists (the folder's .om files are listed).
    """
    output = Path(output)
    exact = output.with_name(output.name + ".om")
    if exact.is_file():
        return exact
    suffixed = sorted(output.parent.glob(f"{output.name}_linux_*.om"))
    if suffixed:
        return suffixed[0]
    present = sorted(p.name for p in output.parent.glob("*.om")) if output.parent.is_dir() else []
    raise ToolchainError(
        f"ATC reported success but wrote neither {exact.name} nor "
        f"{output.name}_linux_<arch>.om in {output.parent}; present: {present}"
    )


def run_atc(argv: list[str], output: str | Path) -> Path:
    """Run ATC, log the full command, and return the produced .om path.

    Raises:
        ToolchainError: ``atc`` not on PATH (names CANN's set_env.sh), or a non-zero
            return code (with the tail of stderr, else of stdout).
    """
    if shutil.which(argv[0]) is None:
        raise ToolchainError(f"`{argv[0]}` not found: {SET_ENV_HINT}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    log.info("running: %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
        raise ToolchainError(f"atc failed with return code {proc.returncode}: " + " | ".join(tail))
    return find_om(output)


def check_atc_outputs(output: Path) -> None:
    """Refuse an ``--output`` where ATC or the sidecar would replace files this tool did not
    write: an .om under either name ATC gives it (``output.om``, ``output_linux_<arch>.om``)
    without this tool's sidecar beside it, or a sidecar JSON of another shape.

    Raises:
        ToolchainError: one line naming the file (nothing is touched).
    """
    exact = output.with_name(output.name + ".om")
    for om in [exact, *sorted(output.parent.glob(f"{output.name}_linux_*.om"))]:
        check_output_file(om, "--output", ours=om_built_here, tool="convert.atc")
        check_output_file(om.with_suffix(".json"), "--output", ours=sidecar_written_here,
                          tool="convert.atc")


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="rewritten ONNX (convert.fix)")
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="output path without .om (ATC may append _linux_<arch>)",
    )
    parser.add_argument(
        "--soc-version",
        "--soc_version",
        dest="soc_version",
        required=True,
        help="e.g. Ascend310P3 (npu-smi info)",
    )
    parser.add_argument("--mode", default="auto", choices=MODES, help="dynamic-shape mode")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument(
        "--max-batch", type=int, default=None,
        help="range maximum; the compiled batch in gears mode (default: 16; detectors 1)"
    )
    parser.add_argument("--min-width", type=int, help="default: from the model description")
    parser.add_argument("--max-width", type=int, help="default: from the model description")
    parser.add_argument("--width-gears", help="comma-separated widths for gears mode")
    parser.add_argument("--min-side", type=int, help="detectors: least H and W (default: stride)")
    parser.add_argument("--max-side", type=int,
                        help="detectors: largest H and W (default: from the resize rule)")
    parser.add_argument("--hw-gears", help="detectors, gears mode: 'H,W;H,W;...'")
    parser.add_argument(
        "--precision-mode",
        "--precision_mode",
        dest="precision_mode",
        help="e.g. force_fp32 against fp16 LSTM accuracy loss",
    )
    parser.add_argument(
        "--log", default="error", choices=("debug", "info", "warning", "error", "null")
    )
    parser.add_argument("--atc", default="atc", help="the ATC executable")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    return parser


def _run(args) -> int:
    check_atc_outputs(args.output)
    model = load_onnx(args.model)
    if quantization_of(model) is not None:
        raise ToolchainError(
            f"{args.model} is an int8 model for ONNX Runtime (convert.quantize); "
            "give atc the fp32 model from convert.fix"
        )
    detector = detector_spec_from_metadata({p.key: p.value for p in model.metadata_props},
                                           str(args.model))
    classifier = classifier_spec_from_metadata(
        {p.key: p.value for p in model.metadata_props}, str(args.model))
    if detector is not None:
        plan, spec = _detector_plan(args, detector), detector
    elif classifier is not None:
        plan, spec = plan_classifier_shape(args.soc_version, classifier, args.mode,
                                           args.min_batch, args.max_batch or 16), classifier
    else:
        spec = ModelSpec.from_onnx(model, str(args.model))
        plan = _recogniser_plan(args, spec)
    argv = build_atc_command(
        args.model, args.output, args.soc_version, plan, args.log, args.precision_mode, args.atc
    )
    print(shlex.join(argv))
    if args.dry_run:
        # The plan and description, so parse_testdata (and a later .om) can be prepared now.
        sidecar = write_sidecar(args.output.with_name(args.output.name + ".om"), plan, spec,
                                args.soc_version, argv, args.model)
        print(f"dry run: atc not run; sidecar {sidecar}")
        return 0
    om_path = run_atc(argv, args.output)
    sidecar = write_sidecar(om_path, plan, spec, args.soc_version, argv, args.model)
    shape = plan.inputs[0]
    print(
        f"built {om_path} ({plan.mode}: {shape.name} {shape.atc_dims()}"
        + (
            f", gears {[g[0] if len(g) == 1 else list(g) for g in plan.gears]}"
            if plan.gears
            else ""
        )
        + f"); sidecar {sidecar}"
    )
    return 0


def _detector_plan(args, spec: DetectorSpec) -> ShapePlan:
    gears = None
    if args.hw_gears:
        pairs = [g.split(",") for g in args.hw_gears.split(";")]
        if any(len(p) != 2 or not all(v.strip().isdigit() for v in p) for p in pairs):
            raise ToolchainError(f"--hw-gears must be 'H,W;H,W;...' integers, got "
                                 f"{args.hw_gears!r}")
        gears = [(int(h), int(w)) for h, w in pairs]
    return plan_detector_shape(args.soc_version, spec, args.mode, args.min_batch,
                               args.max_batch or 1, args.min_side, args.max_side, gears)


def _recogniser_plan(args, spec: ModelSpec) -> ShapePlan:
    min_width = args.min_width or min(spec.min_width, spec.width)
    max_width = args.max_width or max(spec.max_width, spec.width)
    try:
        gears = [int(g) for g in args.width_gears.split(",")] if args.width_gears else None
    except ValueError:
        raise ToolchainError(
            f"--width-gears must be comma-separated integers, got {args.width_gears!r}"
        ) from None
    return plan_shape(
        args.soc_version,
        spec.input_name,
        spec.channels,
        spec.height,
        args.mode,
        args.min_batch,
        args.max_batch or 16,
        min_width,
        max_width,
        gears,
        spec.min_input_width,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
