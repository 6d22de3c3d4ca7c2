"""CTC decoding of CRNN outputs (Graves et al., "Connectionist Temporal Classification",
ICML 2006): greedy (best path) decoding, vectorised over the batch, and prefix beam search.

Inputs are logits or log-probabilities (either works: both go through a softmax, and
``softmax(log_softmax(x)) == softmax(x)``), laid out ``(T, N, C)`` (``time_major=True``,
the exported models' ``output1``) or ``(N, T, C)``. ``lengths`` gives each sample's number
of valid frames; frames past it come from batch padding and are ignored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Decoded:
    """One decoded sample: text and confidence (mean max-probability of the kept frames, 0.0
    when nothing was kept)."""

    text: str
    confidence: float


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=axis, keepdims=True)


def _batch_major(scores: np.ndarray, time_major: bool, alphabet: str) -> np.ndarray:
    """``(N, T, C)`` view of ``scores``, checked against the alphabet (C = characters + blank)."""
    if scores.ndim != 3:
        raise ValueError(f"expected a (T, N, C) or (N, T, C) array, got shape {scores.shape}")
    if scores.shape[2] != len(alphabet) + 1:
        raise ValueError(f"{scores.shape[2]} classes but the alphabet has {len(alphabet)} "
                         "characters + blank")
    return np.swapaxes(scores, 0, 1) if time_major else scores


def _lengths(lengths: Sequence[int] | np.ndarray | None, batch: int, frames: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, frames)
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or np.any(lengths < 0) or np.any(lengths > frames):
        raise ValueError(f"lengths must be {batch} values in 0..{frames}, got {lengths.tolist()}")
    return lengths


def greedy_decode(logits: np.ndarray, alphabet: str, blank: int = 0, time_major: bool = True,
                  lengths: Sequence[int] | np.ndarray | None = None) -> list[Decoded]:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks.

    Args:
        logits: float ``(T, N, C)`` if ``time_major`` else ``(N, T, C)``.
        alphabet: characters of the non-blank classes, in class order.
        blank: index of the blank class; classes above it map to ``alphabet`` shifted by one.
        lengths: valid frames per sample (default: all T).

    Returns:
        One :class:`Decoded` per sample, in batch order.
    """
    scores = _batch_major(logits, time_major, alphabet)
    batch, frames, _ = scores.shape
    valid = np.arange(frames)[None, :] < _lengths(lengths, batch, frames)[:, None]
    probabilities = softmax(scores.astype(np.float32, copy=False))
    best = probabilities.argmax(axis=2)
    best_probability = np.take_along_axis(probabilities, best[..., None], axis=2)[..., 0]
    previous = np.concatenate([np.full((batch, 1), -1), best[:, :-1]], axis=1)
    keep = valid & (best != blank) & (best != previous)
    table = np.array(list(alphabet[:blank] + "\0" + alphabet[blank:]))
    results = []
    for row in range(batch):
        kept = keep[row]
        text = "".join(table[best[row, kept]])
        confidence = float(best_probability[row, kept].mean()) if kept.any() else 0.0
        results.append(Decoded(text, confidence))
    return results


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    top = max(a, b)
    return top + math.log1p(math.exp(-abs(a - b)))


def beam_search_decode(logits: np.ndarray, alphabet: str, blank: int = 0, beam_width: int = 10,
                       time_major: bool = True,
                       lengths: Sequence[int] | np.ndarray | None = None) -> list[Decoded]:
    """CTC prefix beam search (Hannun et al., arXiv:1408.2873, without a language model).

    Each prefix keeps two log-probabilities: ending in a blank and ending in its last
    character. Per frame only the ``beam_width`` most probable classes are extended.
    Confidence is ``exp(log P(prefix) / T)``, the per-frame geometric mean probability.

    Args:
        logits, alphabet, blank, time_major, lengths: as for :func:`greedy_decode`.
        beam_width: prefixes kept per frame (>= 1).

    Returns:
        One :class:`Decoded` per sample, in batch order.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    scores = _batch_major(logits, time_major, alphabet)
    batch, frames, classes = scores.shape
    lengths = _lengths(lengths, batch, frames)
    log_probs = np.log(np.maximum(softmax(scores.astype(np.float32, copy=False)), 1e-30))
    char_of = {c: alphabet[c - 1 if c > blank else c] for c in range(classes) if c != blank}
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
        results.append(Decoded("".join(char_of[c] for c in prefix), confidence))
    return results


DECODERS = {"greedy": greedy_decode, "beam": beam_search_decode}
