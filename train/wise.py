"""Weight-space ensemble of a fine-tuned checkpoint and its initial model (WiSE-FT).

``python -m train.wise FINETUNED.pth OUT.pth --alpha A`` writes, for every floating-point
tensor of the model, ``(1 - A) * initial + A * fine_tuned``: the interpolation of Wortsman et
al., "Robust fine-tuning of zero-shot models" (CVPR 2022, section 2, "WiSE-FT"). Fine-tuning
moves a recogniser towards its new domain and away from what it read before; the
interpolated weights keep most of the first and give back much of the second (for nano-ocr
fine-tuned on ICDAR 2015 crops, the IIIT5K word accuracy it had lost; measured in the
docs/results/training.md, target 1). Integer buffers (BatchNorm's batch counter) are the fine-tuned
model's.

The initial model is ``--init`` (a registry name with weights, such as ``nano-ocr``, or a
checkpoint path), by default the one ``python -m train`` recorded in FINETUNED.pth. Both
must be the same architecture with tensors of the same shapes: a model whose charset changed
in fine-tuning has a classifier with no initial counterpart, and is refused. OUT.pth carries
the model description, so ``python -m convert.pth2onnx OUT.pth X.onnx`` needs no other flag.

The WiSE-FT paper interpolates the model at the end of fine-tuning: ``last.pth``, which the
docs/results/training.md measures as steadier than the ``model.pth`` a small validation split chose.

Examples:
    python -m train.wise work/ft/last.pth work/ft/model_wise.pth --alpha 0.7
    python -m train.wise run/model.pth run/wise.pth --alpha 0.5 --init nano-ocr
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from common.cli import make_parser, run_main
from common.errors import ToolchainError

log = logging.getLogger("train.wise")

WISE_KEY = "wise_ft"  # what OUT.pth records: alpha, the initial model and the fine-tuned file


def check_alpha(alpha: float) -> None:
    """Raises ToolchainError (one line) unless 0 < alpha <= 1."""
    if not 0 < alpha <= 1:
        raise ToolchainError(f"--alpha {alpha}: must be above 0 and at most 1 "
                             "(the fine-tuned model's weight)")


def interpolate(initial: dict, fine_tuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * initial + alpha * fine_tuned`` for every floating-point tensor.

    Args:
        initial: the initial model's state dict (name -> tensor).
        fine_tuned: the fine-tuned model's state dict, with the same names and shapes.
        alpha: the fine-tuned model's weight, 0 < alpha <= 1 (1: the fine-tuned model).

    Returns:
        A new state dict, float tensors in the fine-tuned model's dtype; other tensors (integer
        buffers) are the fine-tuned model's.

    Raises:
        ToolchainError: alpha is outside (0, 1], or a tensor is missing from one model or
            differs in shape (one line naming it).
    """
    check_alpha(alpha)
    names = set(initial) ^ set(fine_tuned)
    if names:
        shown = ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")
        raise ToolchainError(f"the two models differ in their tensors ({shown}): not the same "
                             "architecture")
    mixed = {}
    for name, tuned in fine_tuned.items():
        start = initial[name]
        if start.shape != tuned.shape:
            raise ToolchainError(
                f"{name}: {tuple(start.shape)} in the initial model, {tuple(tuned.shape)} "
                "fine-tuned (a charset changed in fine-tuning leaves no initial classifier "
                "to interpolate with)")
        if tuned.is_floating_point():
            mixed[name] = ((1 - alpha) * start.to(tuned.dtype) + alpha * tuned).to(tuned.dtype)
        else:
            mixed[name] = tuned.clone()
    return mixed


def _is_ours(path: Path) -> bool:
    """Whether ``path`` is a checkpoint this tool wrote (which it may replace)."""
    from models.checkpoint import read_checkpoint

    try:
        return WISE_KEY in read_checkpoint(path)
    except ToolchainError:  # not a checkpoint at all: not ours
        return False


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("finetuned", type=Path,
                        help="the fine-tuned checkpoint (train's last.pth or model.pth)")
    parser.add_argument("output", type=Path, help="the interpolated checkpoint to write")
    parser.add_argument("--alpha", type=float, required=True,
                        help="the fine-tuned model's weight, 0 < A <= 1 (docs/results/training.md "
                             "measures 0.5-0.9 for nano-ocr fine-tuned on ICDAR 2015)")
    parser.add_argument("--init", help="the initial model: a registry name (nano-ocr) or a "
                                       "checkpoint (default: the one train recorded)")
    return parser


def _run(args) -> int:
    from common.outputs import check_output_file
    from models.checkpoint import (
        description_in,
        load_checkpoint,
        read_checkpoint,
        save_checkpoint,
    )
    from train.trainer import initial_model

    check_alpha(args.alpha)  # before any model is read
    if args.output.resolve() == args.finetuned.resolve():
        raise ToolchainError(f"{args.output}: is the fine-tuned checkpoint; give a new path")
    stored = read_checkpoint(args.finetuned)  # its description and recorded init, one read
    spec = description_in(stored, args.finetuned)
    if spec is None:
        raise ToolchainError(f"{args.finetuned}: carries no model description (not written by "
                             "python -m train)")
    init = args.init or stored.get("init")
    if not init:
        raise ToolchainError(f"{args.finetuned}: records no initial model (written before "
                             "train recorded it, or trained from scratch); give --init")
    check_output_file(args.output, "OUT.pth", ours=_is_ours, tool="train.wise")
    fine_tuned = load_checkpoint(args.finetuned, spec)
    start, start_spec, _ = initial_model(init, None, None)
    if start_spec.arch != spec.arch:
        raise ToolchainError(f"{args.finetuned} is {spec.arch}, --init {init} is "
                             f"{start_spec.arch}: not the same architecture")
    mixed = interpolate(start.state_dict(), fine_tuned.state_dict(), args.alpha)
    fine_tuned.load_state_dict(mixed)
    save_checkpoint(args.output, fine_tuned, spec, init=init,
                    **{WISE_KEY: {"alpha": args.alpha, "init": init,
                                  "fine_tuned": str(args.finetuned)}})
    print(f"wrote {args.output}: {spec.arch}, {args.alpha:g} x {args.finetuned} + "
          f"{1 - args.alpha:g} x {init} (WiSE-FT)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
