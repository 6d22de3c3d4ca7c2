"""The ICDAR 2015 scorer on hand-made cases with exact expected precision, recall and H-mean."""

from __future__ import annotations

import pytest

from common.errors import ToolchainError
from eval.det_metrics import Detection, normalise_word, score_image, score_set
from preprocess.icdar_gt import GtWord, read_gt_file


def rect(x0, y0, x1, y1):
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def test_exact_match_and_a_miss():
    gts = [GtWord(rect(0, 0, 100, 20), "Hello"), GtWord(rect(0, 50, 100, 70), "World")]
    dets = [Detection(rect(0, 0, 100, 20), "hello!")]
    counts = score_image(gts, dets)
    assert (counts.gt_care, counts.det_care, counts.matched) == (2, 1, 1)
    assert (counts.e2e_gt_care, counts.e2e_det_care, counts.e2e_correct) == (2, 1, 1)


def test_iou_threshold_is_strictly_above_half():
    gts = [GtWord(rect(0, 0, 100, 20), "abc")]
    # The upper half: intersection 1000, union 2000, IoU exactly 0.5: no match.
    assert score_image(gts, [Detection(rect(0, 0, 100, 10), "abc")]).matched == 0
    # 11 rows of 20: IoU 0.55 > 0.5.
    assert score_image(gts, [Detection(rect(0, 0, 100, 11), "abc")]).matched == 1


def test_one_to_one_matching():
    gts = [GtWord(rect(0, 0, 100, 20), "word")]
    dets = [Detection(rect(0, 0, 100, 20), "word"), Detection(rect(1, 0, 101, 20), "word")]
    summary, _ = score_set({"a": gts}, {"a": dets})
    det = summary["detection"]
    assert (det["matched"], det["detections"], det["ground_truth"]) == (1, 2, 1)
    assert det["precision"] == 0.5 and det["recall"] == 1.0
    assert det["hmean"] == pytest.approx(2 / 3)


def test_dont_care_regions_ignore_detections_inside_them():
    gts = [GtWord(rect(0, 0, 100, 20), "###"), GtWord(rect(0, 50, 100, 70), "scored")]
    dets = [
        Detection(rect(10, 0, 90, 20), "x"),  # wholly inside the ### region: ignored
        Detection(rect(60, 0, 160, 20), "y"),  # 40 % inside: counted, and matches nothing
        Detection(rect(0, 50, 100, 70), "scored"),
    ]
    counts = score_image(gts, dets)
    assert (counts.gt_care, counts.det_care, counts.matched) == (1, 2, 1)
    summary, _ = score_set({"i": gts}, {"i": dets})
    assert summary["detection"]["precision"] == 0.5
    assert summary["detection"]["recall"] == 1.0


def test_end_to_end_needs_the_word_and_skips_short_words():
    gts = [GtWord(rect(0, 0, 100, 20), "Exit"), GtWord(rect(0, 50, 100, 70), "No"),
           GtWord(rect(0, 100, 100, 120), "STOP")]
    dets = [Detection(rect(0, 0, 100, 20), "'exit."),  # matches: case and end punctuation
            Detection(rect(0, 50, 100, 70), "No"),  # short ground truth: don't care
            Detection(rect(0, 100, 100, 120), "SHOP")]  # located, wrong word
    counts = score_image(gts, dets)
    assert (counts.gt_care, counts.det_care, counts.matched) == (3, 3, 3)
    assert (counts.e2e_gt_care, counts.e2e_det_care, counts.e2e_correct) == (2, 2, 1)
    summary, _ = score_set({"i": gts}, {"i": dets})
    e2e = summary["end_to_end"]
    assert e2e["precision"] == 0.5 and e2e["recall"] == 0.5 and e2e["hmean"] == 0.5


def test_sums_over_the_set_not_per_image():
    gts = {"a": [GtWord(rect(0, 0, 10, 10), "aaa")],
           "b": [GtWord(rect(0, 0, 10, 10), "bbb"), GtWord(rect(20, 0, 30, 10), "ccc"),
                 GtWord(rect(40, 0, 50, 10), "ddd")]}
    preds = {"a": [Detection(rect(0, 0, 10, 10), "aaa")],
             "b": [Detection(rect(0, 0, 10, 10), "bbb")]}  # image-wise recalls 1 and 1/3
    summary, rows = score_set(gts, preds)
    assert summary["detection"]["recall"] == 0.5  # 2 of 4, not (1 + 1/3) / 2
    assert summary["detection"]["precision"] == 1.0
    assert rows["b"].matched == 1


def test_image_without_predictions_and_empty_set():
    gts = {"a": [GtWord(rect(0, 0, 10, 10), "aaa")]}
    summary, _ = score_set(gts, {})
    assert summary["detection"] == {**summary["detection"], "precision": 0.0, "recall": 0.0,
                                    "hmean": 0.0}


def test_normalise_word():
    assert normalise_word('"Hello,"') == "hello"
    assert normalise_word("it's") == "it's"
    assert normalise_word("...") == ""


def test_read_gt_file(tmp_path):
    path = tmp_path / "gt_img_1.txt"
    path.write_text("\ufeff1,2,3,2,3,4,1,4,a,b\n\n5,5,9,5,9,9,5,9,###\n", encoding="utf-8")
    words = read_gt_file(path)
    assert words[0].text == "a,b" and words[0].points[2] == (3.0, 4.0)
    assert words[1].dont_care and not words[0].dont_care
    path.write_text("1,2,3,word\n")
    with pytest.raises(ToolchainError, match=r"gt_img_1.txt:1: not an ICDAR 2015 line"):
        read_gt_file(path)
