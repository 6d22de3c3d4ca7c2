"""Train or fine-tune a CTC recogniser: ``python -m train`` (see ``train.trainer``).

The defaults are the fine-tuning recipe measured in docs/results/training.md: from
``--init nano-ocr``, Adam at 1.5e-4 (1e-5 for a model converted from ONNX, such as
``--init ppocr-v6-rec``) with a cosine decay over 8 epochs, batch 32, gradient
norm clipped at 5, BatchNorm statistics and the first 3 convolutions frozen, photometric
augmentation, every 20th index of the first ``--train`` lmdb held out for validation.
(docs/training.md's command adds the data mix, 16 epochs under a time cap and
``--unknown-chars drop``.) From scratch (``--init none``) nothing is frozen or augmented
unless asked.

Outputs in ``--out``: ``model.pth`` (the best validation word accuracy so far, ties broken by
the higher validation 1-NED, carrying its model description, so ``python -m convert.pth2onnx
OUT/model.pth X.onnx`` needs no other flag, and the ``--init`` it started from, for
``python -m train.wise``), ``last.pth`` (model, optimiser, schedule and
position, for ``--resume``), ``log.csv`` and ``curves.png`` (loss and validation accuracy per
epoch). A NaN or infinite loss stops the run with an error; the checkpoints of the last good
epoch stay.

Devices (``--device``): ``cpu``, ``cuda`` or ``npu`` (Ascend, through torch_npu, imported only
then). Many devices: ``torchrun --nproc-per-node N -m train ...`` (gloo on CPU, nccl on CUDA,
hccl on Ascend), each rank on the device of its ``LOCAL_RANK``; rank 0 validates, logs and
writes the checkpoints.

A recogniser that ships as ONNX (``--init ppocr-v6-rec``, ``ppocr-v4-rec`` or ``MODEL.onnx``
carrying this toolchain's description) is converted into a trainable module
(``models.onnx_module``), checked against ONNX Runtime on training crops at 4 widths (a
difference above 1e-4 stops the run), and trained on its logits; it keeps its own charset.
Its checkpoints carry the graph, and ``convert.pth2onnx`` writes the trained weights back into
it.

Examples:
    python -m train --init nano-ocr --train ../shared/data/IC15_train_words --out work/ft
    python -m train --init ppocr-v6-rec --train ../shared/data/IC15_train_words \
        --max-minutes 30 --epochs 20 --out work/ft_v6
    python -m train --arch crnn --init none --train work/synth_en --val work/synth_en_val \\
        --lr 1e-3 --no-freeze-bn --out work/scratch
    torchrun --nproc-per-node 2 -m train --init nano-ocr --train ../shared/data/IC15_train_words \\
        --out work/ft2
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from common.cli import make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file
from infer.device import DEVICE_SPELLINGS, parse_device
from infer.onnxruntime_runner import available_cores
from models.charset import Charset
from models.checkpoint import save_checkpoint
from models.onnx_module import GraphModule
from models.registry import ARCHS
from models.spec import TALL_CROPS
from train.trainer import (
    Run,
    check_converted,
    freeze_batchnorm,
    freeze_convolutions,
    initial_model,
    load_words,
    log_probs,
    make_batch,
    orient_tall_crops,
    plan_epoch,
    validate,
    world,
)

log = logging.getLogger("train")


#: Adam's learning rate when --lr is not given (the fine-tuning recipe).
DEFAULT_LR = 1.5e-4
#: ... and for a model converted from ONNX (PP-OCR's recognisers): Adam's first steps move
#: every weight by about the learning rate whatever its gradient, and 1.5e-4 costs PP-OCRv6
#: 6.6 points of IIIT5K in 4 steps of 16 (docs/results/training.md, converted models).
CONVERTED_LR = 1e-5

def parse_source(text: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:RATIO`` (ratio > 0)."""
    path, _, ratio = text.rpartition(":")
    if path and ratio.replace(".", "", 1).isdigit():
        if float(ratio) <= 0:
            raise ToolchainError(f"--train {text}: the ratio must be > 0")
        return Path(path), float(ratio)
    return Path(text), 1.0


def read_charset(text: str) -> Charset | None:
    """``model`` (None: the model's own), ``corpus:FILE`` (the seed's char_dict: every
    character of the corpus, in order of first appearance) or ``FILE`` (one character per line).
    """
    if text == "model":
        return None
    corpus = text.startswith("corpus:")
    path = Path(text.removeprefix("corpus:"))
    if not path.is_file():
        raise ToolchainError(f"--charset {text}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ToolchainError(f"--charset {text}: not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start})") from None
    if corpus:
        characters = "".join(dict.fromkeys(
            ch for line in content.splitlines() for ch in line.split("\t", 1)[0].strip()))
    else:
        lines = [line.rstrip("\n") for line in content.splitlines()]
        characters = "".join(dict.fromkeys(ch for ch in lines if len(ch) == 1))
    if not characters:
        raise ToolchainError(f"--charset {text}: no characters")
    return Charset(characters, 0)


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("--train", action="append", required=True,
                        help="training lmdb, PATH or PATH:RATIO (repeatable)")
    parser.add_argument("--val", type=Path, action="append", default=[],
                        help="validation lmdb (repeatable; the first chooses model.pth)")
    parser.add_argument("--val-split", type=float, default=0.05,
                        help="without --val: hold out this share of the first --train lmdb "
                             "(every k-th index; 0 to 0.5, 0 for no validation)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--init", default="nano-ocr",
                        help="registry name (nano-ocr, ppocr-v6-rec, ppocr-v4-rec), checkpoint "
                             "path, ONNX CTC recogniser carrying this toolchain's description "
                             "(converted to a trainable module), or none (from scratch)")
    parser.add_argument("--arch", choices=[n for n, e in ARCHS.items() if e.build],
                        help="architecture (from scratch, or of a checkpoint without one)")
    parser.add_argument("--charset", default="model",
                        help="model, FILE (one character per line) or corpus:FILE")
    parser.add_argument("--tall-crops", choices=TALL_CROPS,
                        help="how the written model's description has the toolchain read "
                             "crops at least 1.5 times as high as wide: turn (the default) "
                             "reads them as they are and turned 90 degrees both ways and keeps "
                             "the most confident reading; keep reads them as they are. With "
                             "turn, validation reads them so too; training reads every crop as "
                             "it is (see --orient-tall-crops). --resume keeps the run's own (a "
                             "different one is refused)")
    parser.add_argument("--orient-tall-crops", action="store_true",
                        help="with --tall-crops turn: train each tall crop in the orientation "
                             "(as it is, or turned 90 degrees either way) with the lowest CTC "
                             "loss for its label, chosen again every epoch, instead of as it is")
    parser.add_argument("--epochs", type=positive(int), default=8)
    parser.add_argument("--max-steps", type=positive(int), help="stop after this many updates")
    parser.add_argument("--max-minutes", type=positive(float),
                        help="stop after this much training time (the learning rate decays "
                             "by steps or by time, whichever runs out first; a resumed run "
                             "counts the minutes it spent before)")
    parser.add_argument("--epoch-samples", type=positive(int),
                        help="draws per epoch (default: the sources' total size)")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="global batch")
    parser.add_argument("--lr", type=positive(float), default=None,
                        help=f"Adam's learning rate (default {DEFAULT_LR:g}, {CONVERTED_LR:g} "
                             "for a model converted from ONNX); a resumed run keeps its own")
    parser.add_argument("--clip", type=positive(float), default=5.0, help="gradient norm cap")
    parser.add_argument("--freeze-bn", action="store_true", default=None,
                        help="keep BatchNorm statistics fixed (default: on with --init)")
    parser.add_argument("--no-freeze-bn", dest="freeze_bn", action="store_false", default=None)
    parser.add_argument("--freeze-convs", type=int,
                        help="keep the first N convolutions fixed (default: 3 with --init, "
                             "else 0): less drift from the initial model, and faster")
    parser.add_argument("--ema", type=float, metavar="DECAY",
                        help="validate and keep an exponential moving average of the weights "
                             "(avg = DECAY * avg + (1 - DECAY) * weights after every update; "
                             "torch.optim.swa_utils); 0 < DECAY < 1, e.g. 0.998")
    parser.add_argument("--augment", action="store_true", default=None,
                        help="photometric augmentation of every training sample (contrast, "
                             "brightness, blur, noise, inverted polarity; widths unchanged; "
                             "default: on with --init)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    parser.add_argument("--geometric", action="store_true",
                        help="with --augment: also rotate (up to 4 degrees) and slant (up to "
                             "0.2) samples about their centre, widths unchanged")
    parser.add_argument("--unknown-chars", choices=("skip", "drop"), default="skip",
                        help="a label with characters outside the charset: skip the sample "
                             "(default), or drop those characters and keep it (the model "
                             "learns blanks over them; the 0-9a-z protocol ignores them)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: float16 with a gradient scaler on CUDA and "
                             "Ascend, bfloat16 on a CPU with native bfloat16 (AVX512-BF16 or "
                             "AMX); weights, CTC loss and optimiser stay float32")
    parser.add_argument("--device", default="cpu",
                        help=f"{DEVICE_SPELLINGS}; npu is Ascend and needs torch_npu; an index "
                             "picks one device for a single process; under torchrun give none, "
                             "and each rank takes the device of its LOCAL_RANK")
    parser.add_argument("--threads", type=positive(int), help="torch threads per process")
    parser.add_argument("--workers", type=positive(int), default=available_cores(),
                        help="decoding threads while loading the lmdbs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    return parser


#: The reduced precision ``--amp`` computes in, per device type (``torch.autocast``).
AMP_DTYPES = {"cuda": torch.float16, "npu": torch.float16, "cpu": torch.bfloat16}
#: The collective backend of each device type (``torch.distributed.init_process_group``).
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def training_device(text: str, local_rank: int = 0, size: int = 1) -> tuple[str, str]:
    """The device a training process runs on and its collective backend.

    Args:
        text: ``--device``, spelled as in every tool (``infer.device``: ``cpu``, ``cuda[:N]``,
            ``npu[:N]``, or ``N`` for ``npu:N``); an index only for one process.
        local_rank: this process's index on its host (torchrun's ``LOCAL_RANK``).
        size: the number of processes (torchrun's ``WORLD_SIZE``).

    Returns:
        ``(device, backend)``: e.g. ``("cpu", "gloo")``, ``("cuda:1", "nccl")`` for local
        rank 1 under torchrun, ``("npu:0", "hccl")``.

    Raises:
        ToolchainError: an unknown spelling, or one device index given to several processes
            (they would share one device).
    """
    device = parse_device(text)
    if device.kind == "cpu":
        return "cpu", BACKENDS["cpu"]
    if device.index is not None and size > 1:
        raise ToolchainError(f"--device {text}: {size} processes would share one device; give "
                             f"--device {device.kind}, and each rank takes "
                             f"{device.kind}:LOCAL_RANK")
    if device.index is None and device.kind == "cuda" and size == 1:
        return "cuda", BACKENDS["cuda"]
    index = local_rank if device.index is None else device.index
    return f"{device.kind}:{index}", BACKENDS[device.kind]


def _open_device(device: str) -> None:
    """Make ``device`` usable and current in this process before its process group starts:
    for ``npu``, import torch_npu (Ascend Extension for PyTorch, which registers the ``npu``
    device and the ``hccl`` backend) and ``torch_npu.npu.set_device``; for ``cuda``, check
    that PyTorch sees CUDA and ``torch.cuda.set_device`` an indexed one.

    Raises:
        ToolchainError: torch_npu cannot be imported, or this PyTorch has no CUDA device.
    """
    opened = parse_device(device)
    if opened.kind == "npu":
        try:
            torch_npu = importlib.import_module("torch_npu")
        except ImportError as exc:
            raise ToolchainError(
                f"--device npu needs torch_npu (Ascend Extension for PyTorch, built for torch "
                f"{torch.__version__}) and CANN on an Ascend host; it cannot be imported here "
                f"({exc})") from exc
        torch_npu.npu.set_device(device)
    elif opened.kind == "cuda":
        if not torch.cuda.is_available():
            raise ToolchainError(f"--device {device}: this PyTorch sees no CUDA device "
                                 f"(torch {torch.__version__}); train on --device cpu")
        if opened.index is not None:
            torch.cuda.set_device(opened.index)


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively: the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo`` (Linux; elsewhere, False). Without it oneDNN emulates bfloat16, slower
    than float32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _setup_distributed(text: str) -> tuple[int, int, str]:
    """``(rank, world size, device)`` of this process, its device opened and, under torchrun,
    its process group started on the device's backend."""
    rank, size = world()
    device, backend = training_device(text, int(os.environ.get("LOCAL_RANK", 0)), size)
    _open_device(device)
    if size > 1:
        torch.distributed.init_process_group(backend)
    return rank, size, device


def _run(args) -> int:
    """:func:`_train`; an ``--out`` folder it created and left empty (a run stopped by an error
    or Ctrl-C before its first checkpoint) is removed again."""
    created = not args.out.exists()
    try:
        return _train(args)
    finally:
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            # rmdir removes only an empty folder: another rank may have removed it first,
            # or rank 0 written into it since the check
            with contextlib.suppress(OSError):  # ENOENT or ENOTEMPTY
                args.out.rmdir()


def _train(args) -> int:
    rank, size, device_name = _setup_distributed(args.device)
    if args.amp and device_name == "cpu" and not native_bfloat16():
        raise ToolchainError("--amp on the CPU needs native bfloat16 (AVX512-BF16 or AMX), "
                             "which this CPU lacks (emulated it is slower than float32); "
                             "drop --amp")
    if args.batch_size < size:
        raise ToolchainError(f"--batch-size {args.batch_size} is smaller than the "
                             f"{size} processes")
    init = None if args.init == "none" else args.init
    augment = args.augment if args.augment is not None else init is not None
    if args.geometric and not augment:
        raise ToolchainError("--geometric goes with --augment (on by default with --init)")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ToolchainError(f"--ema {args.ema}: the decay must be between 0 and 1")
    if not 0 <= args.val_split <= 0.5:
        raise ToolchainError(f"--val-split {args.val_split}: the share held out must be between "
                             "0 (none) and 0.5")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or max(1, available_cores() // size))
    out: Path = args.out
    last = out / "last.pth"
    if args.resume and not last.is_file():
        raise ToolchainError(f"--resume: {last} does not exist")
    if args.resume and args.lr is not None:
        raise ToolchainError(f"--resume continues {last} with its own learning rate and "
                             "schedule; leave out --lr (or start a new run with it)")
    if not args.resume and out.exists() and any(out.iterdir()):
        raise ToolchainError(f"{out}: not empty; give a new folder, or --resume to continue")
    # Every rank has looked at --out before rank 0 writes its probe file there: a rank that
    # looked later would take the probe for an earlier run's output.
    if size > 1:
        torch.distributed.barrier()
    if rank == 0:  # creates the folder; one line if it cannot be written. With --resume,
        # last.pth is this run's own checkpoint (read below), replaced at the next epoch's end.
        check_output_file(last, "--out", ours=lambda _: args.resume, tool="python -m train")

    charset = read_charset(args.charset)
    model, spec, what = initial_model(str(last) if args.resume else init, args.arch,
                                      None if args.resume else charset)
    if not args.resume:
        spec = spec.replace(tall_crops=args.tall_crops or "turn")
    elif args.tall_crops not in (None, spec.tall_crops):
        raise ToolchainError(f"--resume: {last} reads tall crops {spec.tall_crops!r}, and a "
                             f"resumed run keeps it; drop --tall-crops {args.tall_crops}")
    if args.orient_tall_crops and spec.tall_crops != "turn":
        raise ToolchainError(f"--orient-tall-crops goes with tall crops read turned; this run "
                             f"reads them {spec.tall_crops!r} (--tall-crops turn is the default)")
    resumed = _resume_state(last, args.ema) if args.resume else None  # before the data loads
    freeze = args.freeze_bn if args.freeze_bn is not None else init is not None
    fixed = freeze_convolutions(model, args.freeze_convs if args.freeze_convs is not None
                                else 3 if init is not None else 0)
    device = torch.device(device_name)
    # On the CPU, channels-last convolution weights (NHWC activations) let oneDNN pick its
    # faster convolution and pooling kernels (docs/results/training.md, training speed: 8-16 %
    # more images/s on a Zen 4); other devices keep their own layout.
    model.to(device, memory_format=torch.channels_last if device.type == "cpu"
             else torch.preserve_format)

    sources = [parse_source(t) for t in args.train]
    first_path = sources[0][0]
    every = round(1 / args.val_split) if not args.val and args.val_split > 0 else 0
    train_sets = []
    # Validation reads tall crops three ways, as the toolchain will, and keeps the most
    # confident reading; --orient-tall-crops trains each in its orientation of lowest loss.
    turns = spec.tall_crops == "turn"
    for number, (path, _) in enumerate(sources):
        keep = (lambda i: i % every != 0) if number == 0 and every else None
        train_sets.append(load_words(path, spec, spec.charset, args.workers, keep,
                                     args.unknown_chars, turns=turns and args.orient_tall_crops))
    val_sets = ([load_words(p, spec, spec.charset, args.workers, unknown=args.unknown_chars,
                            turns=turns)
                 for p in args.val] if args.val
                else [load_words(first_path, spec, spec.charset, args.workers,
                                 lambda i: i % every == 0, args.unknown_chars,
                                 f"the validation split, every {every}th index; give --val "
                                 "LMDB, or --val-split 0 for none", turns)] if every else [])
    ratios = [r for _, r in sources]
    if isinstance(model, GraphModule) and model.source is not None:
        # the converted graph must compute what the shipped file does before it trains
        checked = check_converted(model, spec, train_sets[0])
        if rank == 0:
            log.info("converted %s matches ONNX Runtime on %d training crops (widths %s): "
                     "max difference %.2e", model.source.name, len(checked),
                     ", ".join(str(w) for w, _ in checked), max(d for _, d in checked))
    oriented = _orient(model, train_sets, spec, rank, size, device)
    if rank == 0:
        log.info("start: %s; %d convolutions fixed; augmentation %s; %d processes; train %s; "
                    "validation %s", what, fixed,
                    ("photometric and geometric" if args.geometric else "photometric")
                    if augment else "off", size,
                    ", ".join(f"{s.path.name} {len(s)} (skipped {dict(s.skipped)}"
                              + (f"; {s.trimmed} labels lost characters outside the charset"
                                 if s.trimmed else "")
                              + (f"; {_count(len(s.turned), 'tall crop')}, each trained in "
                                 "the orientation of its lowest loss" if s.turned else "") + ")"
                              for s in train_sets),
                    ", ".join(f"{s.path.name} {len(s)}"
                              + (f" ({_count(len(s.turned), 'tall crop')} read three ways)"
                                 if s.turned else "")
                              for s in val_sets) or "none")

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=args.lr or (
        CONVERTED_LR if isinstance(model, GraphModule) else DEFAULT_LR))
    steps_per_epoch = len(plan_epoch(train_sets, ratios, args.batch_size, args.seed, 0, size,
                                     args.epoch_samples))
    total_steps = min(args.max_steps or 1 << 62, steps_per_epoch * args.epochs)
    began = time.perf_counter()
    budget = args.max_minutes * 60 if args.max_minutes else math.inf

    def progress(step: int) -> float:
        """How far the run is, 0..1: by steps or by time, whichever is further."""
        return min(1.0, max(step / max(1, total_steps), (time.perf_counter() - began) / budget))

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * progress(step))))
    if resumed is not None:
        recorded = resumed.get("init")  # older runs lack it
    else:  # a checkpoint path is recorded whole, so train.wise finds it from anywhere
        recorded = init if init is None or not Path(init).exists() else str(Path(init).resolve())
    run = Run(out, ema=args.ema, init=recorded)
    epoch, step = 0, 0
    average = _moving_average(model, args.ema)
    if resumed is not None:
        state = resumed
        if average is not None:
            average.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        epoch, step, run.best = state["epoch"], state["step"], state["best"]
        run.best_one_minus_ned = state.get("best_one_minus_ned", -1.0)  # older runs lack it
        run.rows = [dict(zip(state["log_keys"], row)) for row in state["log_rows"]]
        # --max-minutes budgets the whole run: the time already spent counts, so the decay
        # goes on from where it was (older runs lack it and start their clock afresh)
        spent = state.get("elapsed")
        began -= spent or 0.0
        log.info("resumed from %s at epoch %d, step %d, %s", last, epoch, step,
                    f"{spent / 60:.1f} minutes in" if spent is not None
                    else "its time so far unknown (written before it was kept)")
        if spent is not None and spent >= budget:
            log.warning("the run has spent its --max-minutes %g already; give a larger "
                        "--max-minutes to train on", args.max_minutes)

    trained = model
    if size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if device.type == "cpu" else [device])
    ctc = torch.nn.CTCLoss(blank=spec.blank, reduction="none", zero_infinity=False)
    # float16 needs its gradients scaled; bfloat16 has float32's exponent range and does not
    scaler = (torch.amp.GradScaler(device.type)
              if args.amp and AMP_DTYPES[device.type] == torch.float16 else None)
    oriented_at = epoch
    while (epoch < args.epochs and step < total_steps
           and not _out_of_time(began, budget, size, device)):
        if epoch != oriented_at:  # the model has moved: choose the orientations again
            oriented = _orient(model, train_sets, spec, rank, size, device)
        batches = plan_epoch(train_sets, ratios, args.batch_size, args.seed, epoch, size,
                             args.epoch_samples)
        model.train()
        if freeze:
            freeze_batchnorm(model)
        losses, seen, start = [], 0, time.perf_counter()
        # One bar per epoch on rank 0; into a log file (not a terminal) a line every 30 s.
        bar = tqdm(batches, unit="batch", desc=f"epoch {epoch + 1}", disable=bool(rank),
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        for members in bar:
            if step >= total_steps or _out_of_time(began, budget, size, device):
                break
            first = len(members) * rank // size
            share = members[first:len(members) * (rank + 1) // size]
            images, targets, lengths = make_batch(
                train_sets, share, spec, (args.seed, epoch, step) if augment else None,
                tilted=args.geometric, first_row=first)
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=AMP_DTYPES[device.type],
                                enabled=bool(args.amp)):
                scores = log_probs(trained, images, spec)
            frames = torch.full((len(share),), scores.shape[0], dtype=torch.long)
            loss = ctc(scores, targets, frames, lengths).sum() * size / len(members)
            part = float(loss.detach()) / size  # this rank's share of the batch's mean loss
            value = part * len(members) / len(share)  # its own samples' mean
            if not math.isfinite(value):
                kept = (f"the last good checkpoints in {out} are kept"
                        if (out / "last.pth").is_file() else "no checkpoint was written yet")
                raise ToolchainError(
                    f"the loss became {value} at step {step + 1} (epoch {epoch + 1}); "
                    f"stopped; {kept} (try a lower --lr)")
            optimiser.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(parameters, args.clip)
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, args.clip)
                optimiser.step()
            schedule.step()
            if average is not None:
                average.update_parameters(model)
            step += 1
            losses.append(part)
            seen += len(members)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        seconds = time.perf_counter() - start
        epoch += 1
        if size > 1 and losses:  # the shares summed over the ranks: each batch's mean loss
            shares = torch.tensor(losses, dtype=torch.float32, device=device)
            torch.distributed.all_reduce(shares)
            losses = shares.tolist()
        if rank == 0:
            _end_epoch(run, model, average, spec, val_sets, optimiser, schedule, epoch, step,
                       losses, seen, seconds, size, began, oriented)
        if size > 1:
            torch.distributed.barrier()
    if size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"trained {spec.arch} for {step} steps ({epoch} epochs) on {size} process(es); "
              + (f"best validation accuracy {run.best:.4f}; " if val_sets
                 else "no validation set, so model.pth is the last epoch; ")
              + str(out / "model.pth"))
    return 0


def _resume_state(last: Path, ema: float | None) -> dict:
    """The contents of ``last.pth`` (read by ``initial_model`` already) for ``--resume``.

    Raises:
        ToolchainError: ``--ema`` is given for a run written without it, or left out for one
            written with it.
    """
    state = torch.load(last, map_location="cpu", weights_only=True)
    if "ema" in state and ema is None:
        raise ToolchainError(f"--resume: {last} keeps a moving average; give "
                             f"--ema {state['ema_decay']} again")
    if ema is not None and "ema" not in state:
        raise ToolchainError(f"--resume: {last} was written without --ema")
    return state


def _count(number: int, noun: str) -> str:
    """``1 tall crop``, ``2 tall crops``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _orient(model: torch.nn.Module, train_sets: list, spec, rank: int, size: int,
            device: torch.device | str = "cpu") -> Counter:
    """``train.trainer.orient_tall_crops`` on rank 0, its choices sent to every rank (from
    ``device``, where the process group's backend works) so all plan the same batches.
    Returns quarter turn -> crops trained in it (empty: no tall crop)."""
    keys = [(s, i) for s, words in enumerate(train_sets) for i in sorted(words.turned)]
    if not keys:
        return Counter()
    if rank == 0:
        orient_tall_crops(model, train_sets, spec)
    if size > 1:
        turns = torch.tensor([train_sets[s].orientation.get(i, 0) for s, i in keys],
                             device=device)
        torch.distributed.broadcast(turns, 0)
        for (s, i), turn in zip(keys, turns.tolist()):
            train_sets[s].orient(i, turn)
    return Counter(train_sets[s].orientation.get(i, 0) for s, i in keys)


def _out_of_time(began: float, budget: float, size: int,
                 device: torch.device | str = "cpu") -> bool:
    """Whether the time budget is spent; under torchrun rank 0 decides for all ranks (a
    broadcast from ``device``), so they stop at the same step."""
    spent = torch.tensor([float(time.perf_counter() - began >= budget)], device=device)
    if size > 1:
        torch.distributed.broadcast(spent, 0)
    return bool(spent.item())


def _moving_average(model: torch.nn.Module, decay: float | None):
    """``--ema``: an exponential moving average of ``model``'s parameters and buffers
    (``torch.optim.swa_utils.AveragedModel``; its first update copies the weights), or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _end_epoch(run: Run, model, average, spec, val_sets, optimiser, schedule, epoch: int,
               step: int, losses: list[float], seen: int, seconds: float, size: int,
               began: float, oriented: Counter | None = None) -> None:
    """Validate, keep the best model, write last.pth and the log (rank 0).

    The best model has the highest validation word accuracy; among equal accuracies, the
    highest 1-NED (one minus the normalised edit distance, ``eval.metrics``), so that a run
    whose accuracy does not move (a small split, or a charset still on CTC's plateau) keeps
    the model that reads closest rather than the first one.

    With ``--ema`` (``average``), the averaged weights are the ones validated and kept in
    model.pth; last.pth holds both, for ``--resume``, and the seconds since the run began
    (``began``, ``time.perf_counter``'s; ``elapsed``), which count against ``--max-minutes``.
    ``oriented``: the epoch's tall crops by the quarter turn they trained in (``_orient``;
    None or empty: no tall crop was oriented).
    """
    kept = model if average is None else average.module
    metrics = (validate(kept, val_sets[0], spec) if val_sets
               else {"word_accuracy": float("nan"), "one_minus_ned": float("nan")})
    others = {f"val_accuracy_{s.path.name}": validate(kept, s, spec)["word_accuracy"]
              for s in val_sets[1:]}
    row = {"epoch": epoch, "step": step,
           "train_loss": sum(losses) / max(1, len(losses)),
           "val_accuracy": metrics["word_accuracy"],
           "val_one_minus_ned": metrics["one_minus_ned"], **others,
           "lr": optimiser.param_groups[0]["lr"], "seconds": seconds,
           "images_per_second": seen / seconds if seconds else 0.0, "processes": size}
    score = (metrics["word_accuracy"], metrics["one_minus_ned"])
    if not val_sets or score > (run.best, run.best_one_minus_ned):
        if val_sets:
            run.best, run.best_one_minus_ned = score
        save_checkpoint(run.out / "model.pth", kept, spec, epoch=epoch, step=step,
                        init=run.init)
    run.rows.append(row)
    keys = run.log_keys()  # a resumed run's rows may lack columns (another --val set)
    extra = {} if average is None else {"ema": average.state_dict(), "ema_decay": run.ema}
    save_checkpoint(run.out / "last.pth", model, spec, epoch=epoch, step=step, init=run.init,
                    best=run.best, best_one_minus_ned=run.best_one_minus_ned,
                    elapsed=time.perf_counter() - began,
                    optimiser=optimiser.state_dict(), schedule=schedule.state_dict(),
                    log_keys=keys, log_rows=[[r.get(k, "") for k in keys] for r in run.rows],
                    **extra)
    run.write_log()
    checked = (f"validation accuracy {row['val_accuracy']:.4f} "
               f"(1-NED {row['val_one_minus_ned']:.4f})" if val_sets else "no validation set")
    oriented = oriented or Counter()
    turned = sum(n for turn, n in oriented.items() if turn)
    log.info("epoch %d: loss %.4f, %s%s, %.0f images/s%s", epoch, row["train_loss"], checked,
                "".join(f", {k[13:]} {v:.4f}" for k, v in others.items()),
                row["images_per_second"],
                f"; {turned} of {oriented.total()} tall crops trained turned" if oriented else "")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
