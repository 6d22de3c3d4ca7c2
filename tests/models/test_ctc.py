"""CTC decoding tables: greedy and prefix beam search."""

from __future__ import annotations

import numpy as np
import pytest

from models.charset import Charset
from models.ctc import beam_search_decode, greedy_decode

ALPHABET = Charset("ab")  # classes: 0 blank, 1 'a', 2 'b'


def peaked(path: list[int], classes: int = 3, high: float = 10.0) -> np.ndarray:
    """(T, 1, C) logits whose argmax follows ``path``."""
    logits = np.zeros((len(path), 1, classes), np.float32)
    logits[np.arange(len(path)), 0, path] = high
    return logits


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ([0, 0, 0], ""),  # all blank
        ([1, 1, 1], "a"),  # repeats merge
        ([1, 0, 1], "aa"),  # a blank splits repeats: "a-a" -> "aa"
        ([1, 2, 1], "aba"),
        ([0, 2, 2, 0, 1, 1, 0], "ba"),
        ([], ""),
    ],
)
def test_greedy_table(path, text):
    logits = peaked(path) if path else np.zeros((0, 1, 3), np.float32)
    (decoded,) = greedy_decode(logits, ALPHABET)
    assert decoded.text == text
    if text:
        expected = np.exp(10) / (np.exp(10) + 2)
        assert decoded.confidence == pytest.approx(expected, rel=1e-5)
    else:
        assert decoded.confidence == 0.0


def test_padding_frames_are_ignored():
    logits = np.concatenate([peaked([1, 0, 2]), peaked([2, 2, 1, 1])], axis=0)  # 7 frames
    batch = np.concatenate([logits, peaked([1, 1, 1, 1, 1, 1, 1])], axis=1)
    first, second = greedy_decode(batch, ALPHABET, lengths=[3, 7])
    assert first.text == "ab" and second.text == "a"


def test_batch_major_and_blank_elsewhere():
    logits = peaked([1, 2, 2])  # (T, 1, C)
    (decoded,) = greedy_decode(np.swapaxes(logits, 0, 1), ALPHABET, time_major=False)
    assert decoded.text == "ab"
    # blank as the last class: class 0 -> 'a', 1 -> 'b', 2 -> blank
    (decoded,) = greedy_decode(peaked([0, 2, 1]), Charset("ab", blank=2))
    assert decoded.text == "ab"


def test_log_probabilities_decode_the_same():
    logits = np.random.default_rng(0).normal(size=(20, 4, 3)).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert greedy_decode(logits, ALPHABET) == greedy_decode(log_probs, ALPHABET)


@pytest.mark.parametrize("path", [[0, 0], [1, 1, 0, 1], [2, 0, 2, 1, 1], [1, 2, 0, 0, 2]])
def test_beam_agrees_with_greedy_on_peaked_inputs(path):
    logits = peaked(path)
    assert beam_search_decode(logits, ALPHABET, beam_width=4)[0].text == \
        greedy_decode(logits, ALPHABET)[0].text


def test_beam_finds_the_more_probable_label_greedy_misses():
    # The best path is blank, blank (P = 0.36, text ""), but the paths "a-", "-a" and "aa"
    # all collapse to "a": P("a") = 0.24 + 0.24 + 0.16 = 0.64.
    probs = np.array([[0.6, 0.4, 0.0], [0.6, 0.4, 0.0]], np.float32)[:, None, :]
    logits = np.log(np.maximum(probs, 1e-9))
    assert greedy_decode(logits, ALPHABET)[0].text == ""
    assert beam_search_decode(logits, ALPHABET, beam_width=3)[0].text == "a"


def test_bad_shapes():
    with pytest.raises(ValueError, match="classes"):
        greedy_decode(np.zeros((2, 1, 5), np.float32), ALPHABET)
    with pytest.raises(ValueError, match="lengths"):
        greedy_decode(np.zeros((2, 1, 3), np.float32), ALPHABET, lengths=[3])


def test_probabilities_are_used_as_they_are():
    probs = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7]], np.float32)[:, None, :]
    (decoded,) = greedy_decode(probs, ALPHABET, probabilities=True)
    assert decoded.text == "ab" and decoded.char_frames == (0, 2) and decoded.frames == 3
    assert decoded.confidence == pytest.approx(0.7)  # softmax again would flatten it


def test_char_frames_mark_where_each_character_starts():
    (decoded,) = greedy_decode(peaked([0, 1, 1, 0, 2, 0, 1]), ALPHABET)
    assert decoded.text == "aba" and decoded.char_frames == (1, 4, 6)


@pytest.mark.parametrize(
    ("text", "classes"), [("", []), ("a", [1]), ("ba", [2, 1]), ("aab", [1, 1, 2])])
def test_charset_round_trip(text, classes):
    assert ALPHABET.encode(text) == classes
    assert ALPHABET.decode(classes) == text
    blank_last = Charset("ab", blank=2)
    assert blank_last.decode(blank_last.encode(text)) == text


def test_charset_errors():
    from common.errors import ToolchainError

    with pytest.raises(ToolchainError, match="character 'c' is not in the charset"):
        ALPHABET.encode("abc")
    assert ALPHABET.unknown("cabd") == ["c", "d"]
    with pytest.raises(ValueError, match="blank"):
        ALPHABET.decode([0])
    with pytest.raises(ToolchainError, match="repeats the character 'a'"):
        Charset("aba")
    with pytest.raises(ToolchainError, match="blank index 5"):
        Charset("ab", blank=5)
