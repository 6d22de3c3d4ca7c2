"""Quantisation-aware training: an int8 recogniser that keeps the fp32 model's readings.

Where post-training quantisation (``convert.quantize``) cannot hold a recogniser's accuracy
budget (PP-OCRv4's: 96-97 % of frames keep their arg-max, IIIT5K 0.89 against 0.91), this
fine-tunes the weights to the int8 model's rounding, then quantises them with the same
rounding. One command, from the shipped fp32 model to the int8 copy:

1. ``convert.quantize.prepare_graph``: the fp32 graph ONNX Runtime quantises (opset 13,
   BatchNorm folded, every node named).
2. Post-training quantisation of it with the model's recipe (``convert.quantize``: activation
   ranges on the calibration images, the nodes the recipe and its sensitivity search keep
   fp32). Its activation ranges and fp32 nodes are kept for step 5.
3. That graph as a trainable module (``models.onnx_module.GraphModule``) that rounds every
   node input the int8 model rounds, as it rounds it (``models.fake_quant``): activations and
   constants with the int8 model's scales, weights with scales recomputed from their current
   values as ONNX Runtime's quantiser computes them.
4. Training on word crops of the training lmdbs with the trainer's photometric augmentation
   (``train.trainer``'s data loading and batches: equal widths, prepared as inference
   prepares them). The loss: distillation (Hinton et al., "Distilling the Knowledge in a
   Neural Network", 2015), the KL divergence from the fp32 teacher's per-frame class
   distribution to the module's, averaged over frames, plus ``--ctc-weight`` (default 1) times
   the CTC loss on the labels; ``--ctc-weight 0`` needs no labels. Adam at 2e-5 with a cosine
   decay to 0 over the run. Measured on PP-OCRv4's recogniser (docs/results/quantization.md):
   distillation alone raised the calibration images' agreement but not IIIT5K (0.8840);
   with the CTC term IIIT5K read 0.9057 against fp32's 0.9110.
5. The trained weights written back into the graph and quantised with step 2's ranges and fp32
   nodes, so the int8 model rounds as the module trained; its agreement is measured against
   the shipped fp32 model on the calibration images (the tool stops below the recipe's
   minimum, writing nothing). The model records what training did
   (``crnn_toolchain.quantization`` -> ``training``).

Data: ``--train`` lmdbs (default: ``$IC15_TRAIN_LMDB``, else ``../shared/data/IC15_train_words``);
neither the test set nor the calibration lmdb (``$IIIT5K_CALIB_LMDB``, else
``../shared/data/IIIT5K_train_500``), so the agreement measured there is on images the
training never saw. Output: for a registry name whose int8 copy this builds (``ppocr-v4-rec``,
``models.weights.INT8_COPIES``), that copy in the weights cache, where the pipeline and the
service take it; else the path given.

Examples:
    python -m train.qat ppocr-v4-rec                       # ~14 minutes on 2 cores
    python -m train.qat ppocr-v6-rec work/v6_qat.onnx --max-minutes 5
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from common.cli import make_parser, positive, run_main
from common.errors import ToolchainError
from convert.quantize import (
    QuantizationResult,
    load_calibration_set,
    prepare_graph,
    quantize_model,
    recipe_for,
)
from infer.onnxruntime_runner import available_cores
from models.describe import describe_onnx
from models.fake_quant import read_qdq
from models.onnx_file import check_model_output
from models.onnx_module import GraphModule
from models.spec import ModelSpec
from models.weights import INT8_COPIES, fetch, int8_path
from preprocess.lmdb_reader import default_calibration_set, default_training_set
from train.trainer import WordSet, load_words, log_probs, make_batch, plan_epoch

log = logging.getLogger("train.qat")

#: Adam's learning rate when --lr is not given (docs/results/quantization.md).
DEFAULT_LR = 2e-5


@dataclass
class QatResult:
    """What :func:`train_qat` did.

    Attributes:
        post_training: agreement of the post-training int8 model with the fp32 model (frames
            whose arg-max class matches, on the calibration images).
        result: the written int8 model's ``QuantizationResult`` (its ``agreement`` is the
            same measure after training).
        steps, seconds, images: the training run's updates, wall time and crops seen.
        losses: the mean loss of each tenth of the run.
    """

    post_training: float
    result: QuantizationResult
    steps: int
    seconds: float
    images: int
    losses: list[float]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per frame, averaged over frames and batch.

    Args:
        student, teacher: float ``[T, B, C]`` log-probabilities (``train.trainer.log_probs``).

    Returns:
        A scalar tensor (nats per frame).
    """
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def train_qat(source: Path, output: Path, train: Sequence[Path], calibration: Path,
              samples: int | None = None, max_minutes: float = 8.0,
              max_steps: int | None = None, batch_size: int = 32, lr: float = DEFAULT_LR,
              ctc_weight: float = 1.0, seed: int = 0, workers: int = 1,
              min_agreement: float | None = None) -> QatResult:
    """Quantisation-aware training of the fp32 recogniser ``source`` into ``output``.

    Args:
        source: fp32 ONNX recogniser carrying this toolchain's description.
        output: the int8 ONNX model to write (whole, or not at all).
        train: word-crop lmdbs to train on (labels are read only with ``ctc_weight``).
        calibration: the lmdb whose images set the activation ranges and measure agreement.
        samples: calibration images (default: the recipe's, else all).
        max_minutes, max_steps: the run ends at whichever comes first.
        ctc_weight: weight of the CTC loss on the labels beside the distillation loss.
        min_agreement: the least agreement written (default: the recipe's).

    Raises:
        ToolchainError: ``source`` is not a described CTC recogniser, an lmdb is missing or
            empty, the loss is not finite, or the int8 model agrees with the fp32 model
            less than the recipe's minimum (``output`` is then not written).
    """
    spec = describe_onnx(source)
    if not isinstance(spec, ModelSpec):
        raise ToolchainError(f"{source}: its task is {spec.task} ({spec.arch}); train.qat "
                             "takes CTC recognisers")
    check_model_output(output, source)
    recipe = recipe_for(spec)
    calibration_set = load_calibration_set(calibration, spec, samples
                                           or recipe.calibration_samples)
    sets = [load_words(path, spec, spec.charset, workers, unknown="drop") for path in train]
    for words in sets:
        if not len(words):
            raise ToolchainError(f"{words.path}: no usable word crops "
                                 f"(skipped: {dict(words.skipped)})")
    with tempfile.TemporaryDirectory(prefix="crnn-qat-") as tmp:
        work = Path(tmp)
        prepared, ranges, ptq = work / "prepared.onnx", work / "ranges.json", work / "ptq.onnx"
        prepare_graph(source, prepared)
        first = quantize_model(prepared, ptq, calibration_set, min_agreement=min_agreement,
                               recipe=recipe, ranges=ranges, reference=source)
        log.info("post-training int8: %.2f%% of frames agree with fp32 (%d node(s) kept fp32)",
                 100 * first.agreement,
                 len({n for entry in first.fp32_nodes for n in entry["nodes"]}))
        graph = onnx.load(str(prepared))
        teacher = GraphModule(graph, logits=True).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        student = GraphModule(graph, logits=True)
        rounded = student.fake_quantize(read_qdq(onnx.load(str(ptq))))
        del graph
        trained_spec = spec.replace(output_kind="logits")
        steps, seconds, images, losses = _fit(
            student, teacher, sets, trained_spec, max_minutes, max_steps, batch_size, lr,
            ctc_weight, seed)
        student.fake_quantize(None)
        fp32 = work / "trained.onnx"
        onnx.save(student.to_onnx(), str(fp32))
        training = {"method": "quantisation-aware training, distillation from the fp32 model"
                              + (f" + {ctc_weight:g} x CTC" if ctc_weight else ""),
                    "train": [str(p) for p in train], "steps": steps, "images": images,
                    "minutes": round(seconds / 60, 2), "batch_size": batch_size, "lr": lr,
                    "rounded_inputs": rounded, "post_training_agreement": first.agreement,
                    "loss": [round(v, 5) for v in losses]}
        result = quantize_model(fp32, output, calibration_set, min_agreement=min_agreement,
                                recipe=recipe, ranges=ranges, fp32_nodes=first.fp32_nodes,
                                reference=source, training=training)
    return QatResult(first.agreement, result, steps, seconds, images, losses)


def _fit(student: GraphModule, teacher: GraphModule, sets: list[WordSet], spec: ModelSpec,
         max_minutes: float, max_steps: int | None, batch_size: int, lr: float,
         ctc_weight: float, seed: int) -> tuple[int, float, int, list[float]]:
    """The training loop: (steps, seconds, images, mean loss per tenth of the run)."""
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=lr)
    budget, began = max_minutes * 60, time.perf_counter()
    total = max_steps or 1 << 62

    def progress(step: int) -> float:
        return min(1.0, max(step / total, (time.perf_counter() - began) / budget))

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * progress(step))))
    ctc = torch.nn.CTCLoss(blank=spec.blank, reduction="mean", zero_infinity=True)
    step, images, epoch, history = 0, 0, 0, []
    # into a log file (not a terminal) a line every 30 s, as the trainer's bar
    bar = tqdm(total=max_steps, unit="step", desc="quantisation-aware training",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    student.train()
    while progress(step) < 1.0:
        for members in plan_epoch(sets, [1.0] * len(sets), batch_size, seed, epoch):
            if progress(step) >= 1.0:
                break
            pixels, targets, lengths = make_batch(sets, members, spec, (seed, epoch, step))
            with torch.no_grad():
                reference = log_probs(teacher, pixels, spec)
            scores = log_probs(student, pixels, spec)
            loss = distillation_loss(scores, reference)
            if ctc_weight:
                frames = torch.full((len(members),), scores.shape[0], dtype=torch.long)
                loss = loss + ctc_weight * ctc(scores, targets, frames, lengths)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ToolchainError(f"quantisation-aware training: the loss became {value} "
                                     f"at step {step + 1}; stopped, nothing written (try a "
                                     "lower --lr)")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 5.0)
            optimiser.step()
            schedule.step()
            step += 1
            images += len(members)
            history.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        epoch += 1
    bar.close()
    student.eval()
    tenth = max(1, len(history) // 10)
    means = [sum(history[k:k + tenth]) / len(history[k:k + tenth])
             for k in range(0, len(history), tenth)]
    return step, time.perf_counter() - began, images, means


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("model", help="a registry recogniser (ppocr-v4-rec: its int8 copy "
                        "into the weights cache) or an fp32 ONNX recogniser carrying this "
                        "toolchain's description")
    parser.add_argument("output", type=Path, nargs="?",
                        help="the int8 ONNX model to write (default for a registry name: its "
                             "int8 copy in the weights cache)")
    parser.add_argument("--train", type=Path, action="append",
                        help="word-crop lmdb to train on (repeatable; default: "
                             "$IC15_TRAIN_LMDB, else ../shared/data/IC15_train_words); neither "
                             "the test set nor the calibration lmdb, which measures agreement")
    parser.add_argument("--calibration", type=Path,
                        help="lmdb for the activation ranges and the agreement check "
                             "($IIIT5K_CALIB_LMDB, else ../shared/data/IIIT5K_train_500)")
    parser.add_argument("--samples", type=positive(int),
                        help="calibration images (default: the recipe's, else all)")
    parser.add_argument("--max-minutes", type=positive(float), default=8.0,
                        help="training time (the learning rate decays over it)")
    parser.add_argument("--max-steps", type=positive(int), help="stop after this many updates")
    parser.add_argument("--batch-size", type=positive(int), default=32)
    parser.add_argument("--lr", type=positive(float), default=DEFAULT_LR,
                        help="Adam's learning rate")
    parser.add_argument("--ctc-weight", type=float, default=1.0,
                        help="weight of the CTC loss on the labels beside distillation (0: "
                             "distillation only, labels unused)")
    parser.add_argument("--min-agreement", type=float,
                        help="least agreement with fp32 on the calibration images, before and "
                             "after training (default: the recipe's)")
    parser.add_argument("--threads", type=positive(int), help="torch threads")
    parser.add_argument("--workers", type=positive(int), default=available_cores(),
                        help="decoding threads while loading the lmdbs")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _run(args) -> int:
    if args.ctc_weight < 0 or not math.isfinite(args.ctc_weight):
        raise ToolchainError(f"--ctc-weight {args.ctc_weight}: give a weight >= 0")
    if args.model in INT8_COPIES:
        built_by = INT8_COPIES[args.model]
        if args.output is None and not built_by.startswith("python -m train.qat"):
            raise ToolchainError(f"{args.model}: its int8 copy is built by `{built_by}`; give "
                                 "an output path for a quantisation-aware trained one")
        output = args.output or int8_path(args.model)
        source = fetch(args.model)
    else:
        source = Path(args.model)
        if not source.is_file():
            raise ToolchainError(f"{args.model}: no such file, and not a model with an int8 "
                                 f"copy in the weights cache ({', '.join(INT8_COPIES)})")
        if args.output is None:
            raise ToolchainError(f"{args.model}: give the int8 model to write (an output is "
                                 f"optional only for {', '.join(INT8_COPIES)})")
        output = args.output
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or available_cores())
    calibration = args.calibration or default_calibration_set()
    train = args.train or [default_training_set()]
    done = train_qat(source, output, train, calibration, args.samples, args.max_minutes,
                     args.max_steps, args.batch_size, args.lr, args.ctc_weight, args.seed,
                     args.workers, args.min_agreement)
    result = done.result
    print(f"quantisation-aware training of {source.name}: {done.steps} steps, {done.images} "
          f"crops, {done.seconds / 60:.1f} min; int8 vs fp32 on {result.calibration_samples} "
          f"calibration images: {result.agreement:.2%} of frames agree (post-training "
          f"{done.post_training:.2%}); loss {done.losses[0]:.4f} -> {done.losses[-1]:.4f}"
          if done.losses else "no training step ran")
    print(f"wrote {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
