"""CTC training and fine-tuning of the registered recognisers, on one process or many (DDP).

Data: word-crop lmdbs (``preprocess.lmdb_reader``), decoded and resized by the inference
code itself (``preprocess.stream.decode_all``: ``preprocess.image.prepare`` with the model's
description, in worker threads), so training sees exactly what inference sees. Batches hold
one resized width each and are normalised by ``preprocess.batching.batch_inputs``: nothing is
padded. Samples that cannot be used are counted by reason and skipped: undecodable images,
labels with characters outside the charset, labels longer than the CTC frames of their width.
With ``--orient-tall-crops`` (under a description that reads tall crops turned), a training
set keeps each tall crop's turned readings too (``load_words(turns=True)``), and training reads
it in the orientation :func:`orient_tall_crops` picks (the lowest CTC loss for its label under
the model at the start of the epoch); otherwise every training crop is read as it is.

Each epoch draws from every source in proportion to its ratio (``--train PATH:RATIO``; 1 by
default), shuffles within each width, cuts batches of ``--batch-size`` and shuffles the batch
order, all from ``--seed`` and the epoch number, so every rank plans the same global batches.

Loss: ``torch.nn.CTCLoss`` (blank from the description) per sample, averaged over the global
batch. Under ``torchrun`` each rank takes a contiguous share of every global batch's rows and
scales its sum by ``world / global rows``; DistributedDataParallel averages the gradients, so
the update equals the one-process update on the whole batch (Li et al., "PyTorch
Distributed", VLDB 2020, for DDP's gradient averaging). Leftover batches smaller than the
number of ranks (and single rows) are dropped for that epoch. BatchNorm statistics are frozen
when fine-tuning (``--freeze-bn``, the default with ``--init``).

Validation: greedy CTC decoding (``models.ctc.decode_output``) and the report's metrics
(``eval.metrics.recognition_metrics``): word accuracy under the field's protocol.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import ToolchainError
from eval.metrics import protocol_for, recognition_metrics
from infer.torch_runner import TorchRunner
from models.charset import Charset
from models.checkpoint import load_checkpoint, read_description
from models.onnx_module import GraphModule, read_graph
from models.registry import arch_entry, build_model, spec_for_arch
from models.spec import TURNS, ModelSpec
from pipeline.recognizer import Failure, Recognizer
from preprocess.batching import batch_inputs, plan_batches
from preprocess.stream import decode_all

log = logging.getLogger(__name__)


@dataclass
class WordSet:
    """Decoded samples of one lmdb: resized uint8 pixels, class targets and text.

    Attributes:
        path: the lmdb.
        pixels, targets, texts: one entry per usable sample (``pixels``: its upright
            reading).
        skipped: reason -> count of samples left out.
        trimmed: samples kept after characters outside the charset were removed from their
            labels (``unknown="drop"`` in :func:`load_words`).
        turned: sample number -> ``[(turn, uint8 pixels), ...]``, the turned readings of the
            tall crops a description with ``tall_crops="turn"`` reads three ways
            (``load_words(turns=True)``). Validation reads them all; training reads the one
            :attr:`orientation` names.
        orientation: sample number -> the quarter turn training reads it in (absent: 0,
            upright), set by :func:`orient_tall_crops`.
    """

    path: Path
    pixels: list[np.ndarray] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    trimmed: int = 0
    turned: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    orientation: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def readings(self, number: int) -> list[tuple[int, np.ndarray]]:
        """Sample ``number``'s readings, ``[(turn, uint8 pixels), ...]``, upright first."""
        return [(0, self.pixels[number]), *self.turned.get(number, [])]

    def reading(self, number: int) -> np.ndarray:
        """The pixels training reads sample ``number`` as: in its :attr:`orientation`."""
        turn = self.orientation.get(number, 0)
        return dict(self.readings(number))[turn] if turn else self.pixels[number]

    def orient(self, number: int, turn: int) -> None:
        """Train sample ``number`` in quarter turn ``turn`` (0: upright) from now on."""
        if turn:
            self.orientation[number] = turn
        else:
            self.orientation.pop(number, None)


def needed_frames(targets: list[int]) -> int:
    """CTC frames a target sequence needs: one per class, plus a blank between repeats."""
    return len(targets) + sum(1 for a, b in zip(targets, targets[1:]) if a == b)


def folds_case(charset: Charset) -> bool:
    """Whether labels are lower-cased for ``charset``: it has lower-case letters and no
    capitals (crnn's 0-9a-z; crnn.pytorch and the field's protocol do the same)."""
    return (any(c.islower() for c in charset.characters)
            and not any(c.isupper() for c in charset.characters))


def load_words(path: Path, spec: ModelSpec, charset: Charset, workers: int = 1,
               keep=None, unknown: str = "skip", role: str = "", turns: bool = False) -> WordSet:
    """Decode an lmdb for training; ``keep(index)`` selects indices (a hold-out split),
    ``role`` says which (named in the error when nothing is left). With ``turns``, the
    turned readings of the crops ``spec`` reads turned are kept too (:attr:`WordSet.turned`):
    validation reads them as the toolchain will, and training reads each in the orientation
    :func:`orient_tall_crops` picks. Such a crop is kept when any of its readings has the CTC
    frames its label needs.
    Labels are lower-cased where the charset has no capitals (:func:`folds_case`).

    ``unknown``: what a label with characters outside the charset does. ``"skip"`` leaves
    the sample out (counted); ``"drop"`` removes those characters from the label and keeps
    the sample (counted in :attr:`WordSet.trimmed`; skipped if nothing is left), so the
    model learns to emit blanks over glyphs it cannot name, as PARSeq's ``CharsetAdapter``
    does (Bautista and Atienza, ECCV 2022, ``strhub/data/utils.py``). The field's protocol
    scores 0-9a-z only, so a symbol dropped from a label costs nothing there.

    Raises:
        ToolchainError: not an lmdb, or no usable sample (the reasons are named).
        ValueError: ``unknown`` is neither ``"skip"`` nor ``"drop"``.
    """
    if unknown not in ("skip", "drop"):
        raise ValueError(f"unknown must be 'skip' or 'drop', got {unknown!r}")
    found, results = decode_all(path, spec, workers, turns=turns)
    words = WordSet(path)
    fold = folds_case(charset)
    if found.num_samples > found.readable:
        words.skipped["no image or label key"] += found.num_samples - found.readable
    for index, label, readings, reason in _by_sample(results):
        if keep is not None and not keep(index):
            continue
        if reason is not None:
            words.skipped["undecodable: " + reason.split(":")[0][:60]] += 1
            continue
        if fold:
            label = label.lower()
        outside = charset.unknown(label)
        if outside and unknown == "skip":
            words.skipped["characters outside the charset"] += 1
            continue
        if outside:
            label = "".join(c for c in label if c not in outside)
            if not label.strip():
                words.skipped["nothing left after dropping characters outside the charset"] += 1
                continue
            words.trimmed += 1
        targets = charset.encode(label)
        if not targets:
            words.skipped["empty label"] += 1
            continue
        fits = [turn for turn, p in readings
                if needed_frames(targets) <= spec.frames(p.shape[1])]
        if not fits:
            words.skipped["label longer than the frames of its width"] += 1
            continue
        if len(readings) > 1:
            words.turned[len(words)] = readings[1:]
            if fits[0]:  # too narrow upright for its label: train on a turned reading
                words.orientation[len(words)] = fits[0]
        words.pixels.append(readings[0][1])
        words.targets.append(targets)
        words.texts.append(label)
    if not words.texts:
        raise ToolchainError(f"{path}{f' ({role})' if role else ''}: no usable sample "
                             f"({dict(words.skipped) or 'empty'})")
    return words


def _by_sample(results) -> Iterator[tuple[int, str | None, list[tuple[int, np.ndarray]],
                                          str | None]]:
    """``preprocess.stream.decode_all``'s results (one per reading, the upright one of each
    index first) as ``(index, label, [(turn, pixels), ...], reason)``, one per sample."""
    current = None
    for index, label, pixels, _size, reason, turn in results:
        if current is not None and index == current[0] and turn:
            current[2].append((turn, pixels))
            continue
        if current is not None:
            yield current
        current = (index, label, [] if reason is not None else [(turn, pixels)], reason)
    if current is not None:
        yield current


def plan_epoch(sets: list[WordSet], ratios: list[float], batch_size: int, seed: int,
               epoch: int, min_rows: int = 1, samples: int | None = None
               ) -> list[list[tuple[int, int]]]:
    """The epoch's global batches: lists of ``(set number, sample number)``, one width each.

    Each source gives ``round(samples * ratio / sum(ratios))`` draws (without replacement up
    to its size, then again), ``samples`` defaulting to the sources' total size.
    """
    rng = np.random.default_rng([seed, epoch])
    total = samples or sum(len(s) for s in sets)
    by_width: dict[int, list[tuple[int, int]]] = {}
    for number, (words, ratio) in enumerate(zip(sets, ratios)):
        draws = round(total * ratio / sum(ratios))
        order = np.concatenate([rng.permutation(len(words))
                                for _ in range(math.ceil(draws / len(words)))])[:draws]
        for i in order:
            by_width.setdefault(words.reading(i).shape[1], []).append((number, int(i)))
    batches = []
    for width in sorted(by_width):
        members = by_width[width]
        rng.shuffle(members)
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    batches = [b for b in batches if len(b) >= max(2, min_rows)]  # a lone row: no estimate
    return [batches[k] for k in rng.permutation(len(batches))]


def photometric(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly degraded copy of resized uint8 pixels (``[H, W]`` or ``[H, W, C]``), same
    shape: contrast and brightness (p 0.5), Gaussian blur (p 0.25), sensor noise (p 0.3) and
    inverted polarity (p 0.15): what real crops vary in beyond what the resize fixes. Only
    pixel values change, so a sample keeps its width (bucket) and its CTC frames."""
    out = pixels.astype(np.float32)
    if rng.random() < 0.5:
        mean = out.mean()
        out = (out - mean) * rng.uniform(0.6, 1.3) + mean + rng.uniform(-30, 30)
    if rng.random() < 0.25:
        from PIL import Image, ImageFilter

        radius = float(rng.uniform(0.4, 1.1))
        image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
        out = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float32)
    if rng.random() < 0.3:
        out = out + rng.normal(0, rng.uniform(2, 8), out.shape)
    if rng.random() < 0.15:
        out = 255 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def geometric(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly rotated (up to 4 degrees, p 0.5) and slanted (up to 0.2, p 0.5) copy of
    resized uint8 pixels (:func:`tilt`): the tilted and italic words of street photos
    (ICDAR 2015) that an upright crop keeps. Width, bucket and CTC frames stay as they are."""
    angle = float(rng.uniform(-4, 4)) if rng.random() < 0.5 else 0.0
    slant = float(rng.uniform(-0.2, 0.2)) if rng.random() < 0.5 else 0.0
    return tilt(pixels, angle, slant) if angle or slant else pixels


def tilt(pixels: np.ndarray, degrees: float, slant: float) -> np.ndarray:
    """``pixels`` (uint8 ``[H, W]`` or ``[H, W, C]``) rotated by ``degrees`` (counter-clockwise)
    and slanted by ``slant`` (a point ``dy`` above the centre moves ``slant * dy`` to the
    right), both about the centre; same shape. Uncovered corners take the median colour of
    the border. Pillow's affine transform, bilinear."""
    from PIL import Image

    height, width = pixels.shape[:2]
    cx, cy = (width - 1) / 2, (height - 1) / 2
    angle = np.deg2rad(degrees)
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    # Pillow maps each output (x, y) to the input (a x + b y + c, d x + e y + f): the inverse
    # of slanting, then rotating, about the centre.
    a, b = cos, -sin + slant * cos
    d, e = sin, cos + slant * sin
    data = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = np.median(border, axis=0).astype(np.uint8)
    image = Image.fromarray(pixels)
    moved = image.transform(image.size, Image.Transform.AFFINE, data,
                            resample=Image.Resampling.BILINEAR,
                            fillcolor=int(fill) if fill.ndim == 0 else tuple(map(int, fill)))
    return np.asarray(moved, np.uint8)


def make_batch(sets: list[WordSet], members: list[tuple[int, int]], spec: ModelSpec,
               augment: tuple[int, ...] | None = None, tilted: bool = False,
               first_row: int = 0):
    """Model input ``float32 [B, C, H, W]``, concatenated targets and their lengths.

    ``augment``: the global batch's seed key (``(seed, epoch, step)``), or None (samples as
    stored). Row ``k`` of the global batch (``members`` are its rows from ``first_row`` on)
    is augmented by :func:`photometric` (and :func:`geometric` first, with ``tilted``) with
    ``numpy.random.default_rng([*augment, k])``, so a sample's augmentation does not depend
    on how the batch is shared across ranks."""
    pixels = [sets[s].reading(i) for s, i in members]
    if augment is not None:
        rngs = [np.random.default_rng([*augment, first_row + k]) for k in range(len(pixels))]
        if tilted:
            pixels = [geometric(p, rng) for p, rng in zip(pixels, rngs)]
        pixels = [photometric(p, rng) for p, rng in zip(pixels, rngs)]
    ((_, images),) = batch_inputs(pixels, spec, len(pixels))
    return (torch.from_numpy(images),
            *ctc_targets([sets[s].targets[i] for s, i in members]))


def ctc_targets(targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.CTCLoss``'s concatenated targets (int64 ``[sum of lengths]``) and their
    lengths (int64 ``[B]``) for a batch's class sequences."""
    return (torch.tensor([c for t in targets for c in t], dtype=torch.long),
            torch.tensor([len(t) for t in targets], dtype=torch.long))


def log_probs(model: nn.Module, images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """``[T, B, C]`` log-probabilities of a batch (the model outputs logits)."""
    output = model(images)
    if not spec.time_major:
        output = output.permute(1, 0, 2)
    return output.float().log_softmax(2)


def _batches_on(model: nn.Module, pixels: list[np.ndarray], spec: ModelSpec, batch_size: int
                ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(positions in pixels, float32 [B, C, H, W] on the model's device)`` in equal-width
    batches of up to ``batch_size``, planned and normalised as inference does."""
    device = next(model.parameters()).device
    for chunk in plan_batches([p.shape[1] for p in pixels], batch_size):
        ((_, images),) = batch_inputs([pixels[k] for k in chunk], spec, len(chunk))
        yield chunk, torch.from_numpy(images).to(device)


def validate(model: nn.Module, words: WordSet, spec: ModelSpec, batch_size: int = 64
             ) -> dict[str, float]:
    """The report's metrics on ``words`` (``eval.metrics.recognition_metrics``), and
    ``"word_accuracy"``, the same as the report's ``accuracy``: under the protocol
    ``eval.metrics.protocol_for`` picks from the labels (the field's lower-case 0-9a-z for Latin
    words, exact match for Chinese ones, which 0-9a-z would erase).

    The live model runs through the same reading loop as inference (``pipeline.Recognizer.read``
    over ``infer.TorchRunner.from_module``): equal-width batches of up to ``batch_size``, and
    a sample with turned readings (:attr:`WordSet.turned`) read all ways with its most
    confident reading kept, as ``eval.postprocess`` does. The model is left in eval mode.

    Raises:
        ToolchainError: the engine failed on a batch (named with its reason).
    """
    with Recognizer(TorchRunner.from_module(model, spec), spec, batch_size) as recognizer:
        answers = recognizer.read([words.readings(i) for i in range(len(words))])
    for number, answer in enumerate(answers):
        if isinstance(answer, Failure):
            raise ToolchainError(f"validation sample {number}: {answer.reason}")
    ordered = [answer.text for answer in answers]
    metrics = recognition_metrics(ordered, words.texts, protocol_for(words.texts))
    metrics["word_accuracy"] = metrics["accuracy"]
    return metrics


def orient_tall_crops(model: nn.Module, sets: list[WordSet], spec: ModelSpec,
                      batch_size: int = 64) -> Counter:
    """Choose the orientation training reads each tall crop in (:attr:`WordSet.orientation`):
    of its readings (upright and turned a quarter each way, :attr:`WordSet.turned`) that have
    the CTC frames its label needs, the one whose CTC loss for its label is lowest under
    ``model`` (ties: upright, then counter-clockwise). A word written downwards is then
    learnt as the model will read it, turned, rather than squeezed upright. The loss is the
    label's negative log-likelihood, so readings of different widths compare.

    Readings go through the model in equal-width batches of up to ``batch_size`` (as
    :func:`validate`'s), without gradients; the model is left in eval mode.

    Returns:
        quarter turn -> how many crops now train in it (0: upright).
    """
    options = [(s, i, turn, pixels) for s, words in enumerate(sets)
               for i in sorted(words.turned) for turn, pixels in words.readings(i)
               if needed_frames(words.targets[i]) <= spec.frames(pixels.shape[1])]
    chosen: Counter = Counter()
    if not options:
        return chosen
    ctc = nn.CTCLoss(blank=spec.blank, reduction="none")
    loss = np.empty(len(options))
    model.eval()
    with torch.no_grad():
        for chunk, images in _batches_on(model, [pixels for *_, pixels in options], spec,
                                         batch_size):
            scores = log_probs(model, images, spec).cpu()
            flat, lengths = ctc_targets([sets[options[k][0]].targets[options[k][1]]
                                         for k in chunk])
            loss[chunk] = ctc(scores, flat, torch.full((len(chunk),), scores.shape[0]),
                              lengths).numpy()
    best: dict[tuple[int, int], tuple[float, int, int]] = {}
    for k, (s, i, turn, _) in enumerate(options):
        key = (float(loss[k]), TURNS.index(turn), turn)
        if (s, i) not in best or key < best[(s, i)]:
            best[(s, i)] = key
    for (s, i), (_, _, turn) in best.items():
        sets[s].orient(i, turn)
        chosen[turn] += 1
    return chosen


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed (eval mode) while the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def freeze_convolutions(model: nn.Module, count: int) -> int:
    """Stop training the first ``count`` convolutions (in module order); returns how many."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)][:max(0, count)]
    for convolution in convolutions:
        for parameter in convolution.parameters():
            parameter.requires_grad_(False)
    return len(convolutions)


def initial_model(init: str | None, arch: str | None, charset: Charset | None,
                  rnn_layout: str = "auto") -> tuple[nn.Module, ModelSpec, str]:
    """The model to start from, its description and a line saying what was done.

    Args:
        init: a registry name with weights (``nano-ocr``, or ``ppocr-v6-rec`` and the other
            recognisers that ship as ONNX), a checkpoint path, an ONNX CTC recogniser carrying
            this toolchain's description (``MODEL.onnx``), or None (from scratch, which needs
            ``arch``).
        arch: the architecture (from scratch, or of a checkpoint without a description).
        charset: replaces the model's characters and blank (None: keep them);
            layers whose shapes change (the classifier) start from scratch.

    A model that ships as ONNX is converted into a trainable module
    (``models.onnx_module.GraphModule``) returning logits: its description says
    ``output_kind="logits"``, and ``convert.pth2onnx`` writes the weights back into the
    original graph.

    Raises:
        ToolchainError: an unknown name, a missing or undescribed file, a graph the conversion
            does not cover, or a new charset for a converted model (its classifier is part of
            the graph).
    """
    from models.weights import fetch

    if init is None:
        if arch is None:
            raise ToolchainError("from scratch needs --arch (or give --init)")
        spec = spec_for_arch(arch)
        model, what = None, f"{arch} from scratch"
    else:
        path = Path(init)
        if not path.exists() and not init.endswith((".pth", ".pt", ".onnx")):
            entry = arch_entry(init)
            path = fetch(init)
            spec = spec_for_arch(entry.name) if entry.build is not None else None
        else:
            spec = (None if path.suffix == ".onnx" else spec_for_arch(arch) if arch
                    else read_description(path))
            if spec is None and path.suffix != ".onnx":
                raise ToolchainError(f"{path}: carries no model description; give --arch")
        if path.suffix == ".onnx":
            model, spec = _converted(path)
            what = (f"{spec.arch} from {init}, converted from ONNX ({len(model.convolutions())} "
                    f"convolutions, {sum(p.numel() for p in model.parameters()):,} weights)")
        else:
            model = load_checkpoint(path, spec, rnn_layout)
            what = f"{spec.arch} from {init}"
    if charset is not None and (charset.characters, charset.blank) != (spec.alphabet,
                                                                         spec.blank):
        if isinstance(model, GraphModule):
            raise ToolchainError(f"--charset: {init} is converted from ONNX and keeps its own "
                                 f"charset of {len(spec.alphabet)} characters (its classifier "
                                 "is part of the graph); leave out --charset, and "
                                 "--unknown-chars drop keeps labels with other characters")
        new_spec = spec.replace(alphabet=charset.characters, blank=charset.blank)
        fresh = build_model(new_spec)
        if model is not None:
            old = model.state_dict()
            state = fresh.state_dict()
            copied = {k: v for k, v in old.items() if k in state and state[k].shape == v.shape}
            fresh.load_state_dict({**state, **copied})
            what += (f"; charset of {len(new_spec.alphabet)} characters: "
                     f"{len(state) - len(copied)} tensors start from scratch")
        model, spec = fresh, new_spec
    elif model is None:
        model = build_model(spec)
    return model, spec, what


def _converted(path: Path) -> tuple[GraphModule, ModelSpec]:
    """An ONNX recogniser as a trainable module returning logits, and its description saying
    so (``output_kind="logits"``)."""
    from models.describe import describe_onnx

    spec = describe_onnx(path)
    if not isinstance(spec, ModelSpec):
        raise ToolchainError(f"{path}: its task is {spec.task} ({spec.arch}); --init takes a "
                             "CTC recogniser")
    model = read_graph(path)
    if spec.output_kind == "probabilities":
        if model.logits_name is None:
            raise ToolchainError(f"{path}: its output is probabilities, but not from a Softmax "
                                 "over classes, so it has no logits to train on")
        model.logits = True
        spec = spec.replace(output_kind="logits")
    return model, spec


def check_converted(model: GraphModule, spec: ModelSpec, words: WordSet,
                    tolerance: float = 1e-4, widths: int = 4) -> list[tuple[int, float]]:
    """Compare a converted model with ONNX Runtime running the file it came from
    (``model.source``) on real crops of ``words`` at up to ``widths`` different input widths
    (the narrowest, the widest and between), through ``infer.compare.compare_runners``.

    Returns:
        ``(input width, max |onnxruntime - torch|)`` per crop, on the graph's own output.

    Raises:
        ToolchainError: a difference above ``tolerance`` (naming the width), or ``words`` is
            empty.
    """
    from infer.compare import compare_runners
    from infer.onnxruntime_runner import OnnxRuntimeRunner

    if not len(words):
        raise ToolchainError("no training crops to check the converted model on")
    by_width: dict[int, int] = {}
    for number in range(len(words)):
        by_width.setdefault(words.reading(number).shape[1], number)
    ordered = sorted(by_width)
    picks = sorted({ordered[round(k * (len(ordered) - 1) / max(1, widths - 1))]
                    for k in range(widths)})
    feeds = [{spec.input_name: batch_inputs([words.reading(by_width[w])], spec, 1)[0][1]}
             for w in picks]
    logits, model.logits = model.logits, False
    try:
        with TorchRunner.from_module(model, spec) as reference, \
                OnnxRuntimeRunner(model.source) as candidate:
            compared = compare_runners(reference, candidate, feeds, [spec.output_name])
    finally:
        model.logits = logits
    found = [(width, result.max_abs_diff) for width, result in zip(picks, compared)]
    for width, difference in found:
        if difference > tolerance:
            raise ToolchainError(
                f"{model.source}: the converted model differs from ONNX Runtime by "
                f"{difference:.3g} (> {tolerance:g}) on a real crop of width {width}; "
                "training would start from another model, so it stops here")
    return found


@dataclass
class Run:
    """What one training run keeps in OUT: the log rows and the best validation accuracy."""

    out: Path
    rows: list[dict] = field(default_factory=list)
    best: float = -1.0  # the kept model's validation word accuracy
    best_one_minus_ned: float = -1.0  # and its 1-NED, which breaks ties in word accuracy
    ema: float | None = None  # --ema's decay, stored in last.pth beside the average
    init: str | None = None  # --init (a registry name or a path; None: from scratch),
    # recorded in model.pth and last.pth for train.wise

    def log_keys(self) -> list[str]:
        """Every column of the log's rows, in order of first appearance: a resumed run whose
        ``--val`` sets differ has rows with different columns."""
        return list(dict.fromkeys(key for row in self.rows for key in row))

    def write_log(self) -> None:
        """Write ``log.csv`` (whole, or not at all; a column a row lacks is empty) and
        ``curves.png`` from :attr:`rows`."""
        path = self.out / "log.csv"
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.log_keys(), restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(partial, path)
        plot(self.rows, self.out / "curves.png")


def plot(rows: list[dict], path: Path) -> None:
    """A PNG of the training loss and the validation accuracy per epoch (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, loss_axis = pyplot.subplots(figsize=(6, 3.5))
    epochs = [r["epoch"] for r in rows]
    loss_axis.plot(epochs, [r["train_loss"] for r in rows], "o-", color="tab:red")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training CTC loss", color="tab:red")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(epochs, [r["val_accuracy"] for r in rows], "s-", color="tab:blue")
    accuracy_axis.set_ylabel("validation word accuracy", color="tab:blue")
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=90)
    pyplot.close(figure)
    os.replace(partial, path)


def world() -> tuple[int, int]:
    """``(rank, world size)`` under torchrun (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
