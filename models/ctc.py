"""CTC decoding of recogniser outputs (Graves et al., "Connectionist Temporal Classification",
ICML 2006): greedy (best path) decoding, vectorised over the batch, and prefix beam search.

Inputs are logits or log-probabilities (``probabilities=False``: both go through a softmax,
and ``softmax(log_softmax(x)) == softmax(x)``) or probabilities (``probabilities=True``,
used as they are), laid out ``(T, N, C)`` (``time_major=True``) or ``(N, T, C)``. Classes
map to characters through a :class:`models.charset.Charset`. ``lengths`` gives each
sample's number of valid frames; frames past it come from batch padding and are ignored.
:func:`decode_output` reads the layout and kind from a model description.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from models.charset import Charset
from models.spec import TURNS, ModelSpec

R = TypeVar("R")  # a reading: anything with a ``confidence``


@dataclass(frozen=True)
class Decoded:
    """One decoded sample.

    Attributes:
        text: the decoded string.
        confidence: mean max-probability of the kept frames (greedy), or the per-frame
            geometric mean probability of the best prefix (beam); 0.0 when nothing was kept.
        char_frames: frame index of each character of ``text`` (greedy: the frame where the
            character's run starts); empty for beam search.
        frames: number of valid frames the sample had.
    """

    text: str
    confidence: float
    char_frames: tuple[int, ...] = ()
    frames: int = 0


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=axis, keepdims=True)


def _batch_major(scores: np.ndarray, time_major: bool, charset: Charset) -> np.ndarray:
    """``(N, T, C)`` view of ``scores``, checked against the charset (C = characters + blank)."""
    if scores.ndim != 3:
        raise ValueError(f"expected a (T, N, C) or (N, T, C) array, got shape {scores.shape}")
    if scores.shape[2] != charset.num_classes:
        raise ValueError(f"{scores.shape[2]} classes but the charset has "
                         f"{len(charset.characters)} characters + blank")
    return np.swapaxes(scores, 0, 1) if time_major else scores


def _probabilities(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    scores = scores.astype(np.float32, copy=False)
    return scores if probabilities else softmax(scores)


def _lengths(lengths: Sequence[int] | np.ndarray | None, batch: int, frames: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, frames)
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or np.any(lengths < 0) or np.any(lengths > frames):
        raise ValueError(f"lengths must be {batch} values in 0..{frames}, got {lengths.tolist()}")
    return lengths


def greedy_decode(scores: np.ndarray, charset: Charset, time_major: bool = True,
                  lengths: Sequence[int] | np.ndarray | None = None,
                  probabilities: bool = False) -> list[Decoded]:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks.

    Args:
        scores: float ``(T, N, C)`` if ``time_major`` else ``(N, T, C)``.
        charset: the classes' characters and the blank.
        lengths: valid frames per sample (default: all T).
        probabilities: ``scores`` already hold probabilities (no softmax applied).

    Returns:
        One :class:`Decoded` per sample, in batch order.

    Raises:
        ValueError: ``scores`` is not 3-D, its class axis does not fit ``charset``, or
            ``lengths`` does not fit the batch.
    """
    scores = _batch_major(scores, time_major, charset)
    batch, frames, _ = scores.shape
    lengths = _lengths(lengths, batch, frames)
    valid = np.arange(frames)[None, :] < lengths[:, None]
    probs = _probabilities(scores, probabilities)
    best = probs.argmax(axis=2)
    best_probability = np.take_along_axis(probs, best[..., None], axis=2)[..., 0]
    previous = np.concatenate([np.full((batch, 1), -1), best[:, :-1]], axis=1)
    keep = valid & (best != charset.blank) & (best != previous)
    table = charset.class_table()
    results = []
    for row in range(batch):
        kept = keep[row]
        text = "".join(table[best[row, kept]])
        confidence = float(best_probability[row, kept].mean()) if kept.any() else 0.0
        results.append(Decoded(text, confidence, tuple(np.flatnonzero(kept).tolist()),
                               int(lengths[row])))
    return results


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    top = max(a, b)
    return top + math.log1p(math.exp(-abs(a - b)))


def beam_search_decode(scores: np.ndarray, charset: Charset, beam_width: int = 10,
                       time_major: bool = True,
                       lengths: Sequence[int] | np.ndarray | None = None,
                       probabilities: bool = False) -> list[Decoded]:
    """CTC prefix beam search (Hannun et al., arXiv:1408.2873, without a language model).

    Each prefix keeps two log-probabilities: ending in a blank and ending in its last
    character. Per frame only the ``beam_width`` most probable classes are extended.
    Confidence is ``exp(log P(prefix) / T)``, the per-frame geometric mean probability.

    Args:
        scores, charset, time_major, lengths, probabilities: as for :func:`greedy_decode`.
        beam_width: prefixes kept per frame (>= 1).

    Returns:
        One :class:`Decoded` per sample, in batch order.

    Raises:
        ValueError: ``beam_width < 1``, or as :func:`greedy_decode`.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    scores = _batch_major(scores, time_major, charset)
    batch, frames, _classes = scores.shape
    lengths = _lengths(lengths, batch, frames)
    log_probs = np.log(np.maximum(_probabilities(scores, probabilities), 1e-30))
    blank = charset.blank
    results = []
    for row in range(batch):
        beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
        for t in range(int(lengths[row])):
            frame = log_probs[row, t]
            candidates = np.argsort(frame)[::-1][:beam_width]
            nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
            for prefix, (p_blank, p_char) in beams.items():
                p_total = _log_add(p_blank, p_char)
                for c in candidates:
                    p = float(frame[c])
                    if c == blank:
                        entry = nxt[prefix]
                        entry[0] = _log_add(entry[0], p_total + p)
                        continue
                    extended = prefix + (int(c),)
                    entry = nxt[extended]
                    if prefix and prefix[-1] == c:
                        # Repeat: only a blank in between starts a new character.
                        entry[1] = _log_add(entry[1], p_blank + p)
                        same = nxt[prefix]
                        same[1] = _log_add(same[1], p_char + p)
                    else:
                        entry[1] = _log_add(entry[1], p_total + p)
            ranked = sorted(nxt.items(), key=lambda kv: _log_add(*kv[1]), reverse=True)
            beams = {prefix: (v[0], v[1]) for prefix, v in ranked[:beam_width]}
        prefix, (p_blank, p_char) = max(beams.items(), key=lambda kv: _log_add(*kv[1]))
        steps = max(int(lengths[row]), 1)
        confidence = math.exp(_log_add(p_blank, p_char) / steps) if prefix else 0.0
        results.append(Decoded(charset.decode(prefix), confidence, (), int(lengths[row])))
    return results


DECODERS = ("greedy", "beam")


def decode_output(spec: ModelSpec, scores: np.ndarray, widths: Sequence[int],
                  decoder: str = "greedy", beam_width: int = 10) -> list[Decoded]:
    """Decode a model's output batch with the layout, kind and charset of its description.

    Args:
        spec: the model description.
        scores: the output, ``spec.output_shape(N, W)`` (``W`` the batch's input width).
        widths: each sample's unpadded input width in pixels; its frames are
            ``spec.frames(width)``, the rest is padding.
        decoder: ``"greedy"`` or ``"beam"``.
        beam_width: prefixes kept per frame by beam search.

    Raises:
        ValueError: an unknown decoder, or as :func:`greedy_decode`/:func:`beam_search_decode`.
    """
    lengths = [spec.frames(width) for width in widths]
    common = {"time_major": spec.time_major, "lengths": lengths,
              "probabilities": spec.output_kind == "probabilities"}
    if decoder == "greedy":
        return greedy_decode(scores, spec.charset, **common)
    if decoder == "beam":
        return beam_search_decode(scores, spec.charset, beam_width, **common)
    raise ValueError(f"decoder {decoder!r} is unknown; use one of {DECODERS}")


def most_confident(readings: Sequence[tuple[int, R]]) -> R:
    """The reading to keep of one crop's readings (``ModelSpec.tall_crops="turn"``): the one
    with the highest ``confidence`` (:attr:`Decoded.confidence`); equal confidences go to the
    upright reading, then counter-clockwise (the order of ``models.spec.TURNS``), so the
    choice does not depend on the order the readings were decoded in.

    Args:
        readings: ``(quarter turn, reading)`` pairs; each reading has a ``confidence``
            (a :class:`Decoded`, or a result built from one).

    Raises:
        ValueError: no reading.
    """
    if not readings:
        raise ValueError("no reading to choose from")
    return max(readings, key=lambda r: (r[1].confidence, -TURNS.index(r[0])))[1]
