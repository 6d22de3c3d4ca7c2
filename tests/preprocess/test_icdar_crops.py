"""preprocess.icdar_crops: ICDAR 2015-style images + ground truth -> a word-crop lmdb."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.errors import ToolchainError
from eval import postprocess
from preprocess import icdar_crops
from preprocess.lmdb_reader import open_lmdb, read_sample
from preprocess.lmdb_writer import write_word_lmdb
from tests.conftest import IIIT5K, word_image

IC15_TEST = IIIT5K.parent / "IC15_test_even"


@pytest.fixture
def icdar_folder(tmp_path):
    """Two images with words at known places, an image that is not one, and a ground truth
    without its image."""
    images, gts = tmp_path / "images", tmp_path / "gts"
    images.mkdir()
    gts.mkdir()
    canvas = Image.new("RGB", (400, 200), "white")
    canvas.paste(word_image("HOUSE", 120, 40, "RGB"), (50, 30))
    canvas.paste(word_image("cat", 80, 40, "RGB"), (250, 120))
    canvas.save(images / "img_2.jpg", quality=95)
    Image.new("RGB", (100, 50), "grey").save(images / "img_10.jpg")
    (images / "img_4.jpg").write_bytes(b"not a jpeg")
    (gts / "gt_img_2.txt").write_text(
        "\ufeff50,30,170,30,170,70,50,70,HOUSE\n"
        "250,120,330,120,330,160,250,160,cat\n"
        "0,0,10,0,10,10,0,10,###\n"  # don't care: not a sample
        "380,180,420,180,420,220,380,220,edge,word\n",  # clipped to the image; comma kept
        encoding="utf-8")
    (gts / "gt_img_10.txt").write_text("500,500,600,500,600,540,500,540,outside\n"
                                       "10,10,60,12,60,30,10,28,tilt\n")
    (gts / "gt_img_4.txt").write_text("0,0,10,0,10,10,0,10,lost\n")
    (gts / "gt_img_7.txt").write_text("0,0,10,0,10,10,0,10,orphan\n")
    return tmp_path


def _samples(path):
    env = open_lmdb(path)
    with env.begin() as txn:
        count = int(txn.get(b"num-samples"))
        samples = [read_sample(txn, i) for i in range(1, count + 1)]
    env.close()
    return [(Image.open(io.BytesIO(s.image)), s.label.decode()) for s in samples]


def test_box_crops_in_image_order_with_every_loss_counted(icdar_folder, capsys):
    out = icdar_folder / "words"
    assert icdar_crops.main(["--images", str(icdar_folder / "images"), "--gts",
                             str(icdar_folder / "gts"), "--out", str(out)]) == 0
    samples = _samples(out)
    assert [label for _, label in samples] == ["HOUSE", "cat", "edge,word", "tilt"]
    assert [image.size for image, _ in samples] == [(120, 40), (80, 40), (20, 20), (50, 20)]
    house = np.asarray(samples[0][0].convert("L"), float)
    expected = np.asarray(word_image("HOUSE", 120, 40), float)
    assert np.abs(house - expected).mean() < 8  # the very pixels of the word (JPEG aside)
    line = capsys.readouterr().out
    assert "wrote 4 word crops (box) from 2 images" in line
    for reason in ("'words lost: no area inside the image': 1",
                   "'words lost: unreadable image': 1",
                   "'words lost: no image for the ground truth': 1", "unreadable image img_4.jpg"):
        assert reason in line


def test_warp_rectifies_the_quadrilateral(icdar_folder):
    out = icdar_folder / "warped"
    assert icdar_crops.main(["--images", str(icdar_folder / "images"), "--gts",
                             str(icdar_folder / "gts"), "--out", str(out), "--crop", "warp"]) == 0
    sizes = {label: image.size for image, label in _samples(out)}
    assert sizes["HOUSE"] == (120, 40) and sizes["tilt"] == (50, 18)  # mean edge lengths


def test_bad_input_leaves_nothing(icdar_folder, capsys):
    (icdar_folder / "gts" / "gt_img_10.txt").write_text("1,2,3,not a line\n")
    out = icdar_folder / "words"
    assert icdar_crops.main(["--images", str(icdar_folder / "images"), "--gts",
                             str(icdar_folder / "gts"), "--out", str(out)]) == 1
    assert "gt_img_10.txt:1: not an ICDAR 2015 line" in capsys.readouterr().err
    assert not out.exists() and not list(icdar_folder.glob(".words.partial-*"))
    out.mkdir()
    assert icdar_crops.main(["--images", str(icdar_folder / "images"), "--gts",
                             str(icdar_folder / "gts"), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert icdar_crops.main(["--images", str(icdar_folder / "nope"), "--gts",
                             str(icdar_folder / "gts"), "--out", str(out / "x")]) == 1
    assert "no such folder (--images)" in capsys.readouterr().err


def test_writer_appears_whole_or_not_at_all(tmp_path):
    def entries():
        yield b"png", "first"
        raise KeyboardInterrupt  # as Ctrl-C halfway

    with pytest.raises(KeyboardInterrupt):
        write_word_lmdb(tmp_path / "db", entries())
    assert list(tmp_path.iterdir()) == []
    assert write_word_lmdb(tmp_path / "db", iter([(b"a", "x"), (b"b", "y")])) == 2
    with pytest.raises(ToolchainError, match="already exists"):
        write_word_lmdb(tmp_path / "db", iter([]))


@pytest.mark.skipif(not IC15_TEST.is_dir(), reason=f"ICDAR 2015 test images not at {IC15_TEST}")
def test_real_ic15_test_half_gives_the_scored_words(tmp_path):
    out = tmp_path / "ic15_words"
    assert icdar_crops.main(["--images", str(IC15_TEST / "images"), "--gts",
                             str(IC15_TEST / "gts"), "--out", str(out)]) == 0
    scored = sum(1 for gt in (IC15_TEST / "gts").glob("gt_*.txt")
                 for line in gt.read_text(encoding="utf-8-sig").splitlines()
                 if line.strip() and line.split(",", 8)[8] != "###")
    assert scored == 1067
    report = tmp_path / "r.json"
    assert postprocess.main(["--test-dir", str(out), "--pth", str(_nano()), "--arch", "nano-ocr",
                             "--report",
                             str(report)]) == 0
    import json

    result = json.loads(report.read_text())
    assert result["samples"] == 1067 and result["failed"] == 0
    assert 0.45 < result["accuracy"] < 0.58  # nano-ocr reads about half of these words


def _nano():
    from models.weights import fetch

    return fetch("nano-ocr")
