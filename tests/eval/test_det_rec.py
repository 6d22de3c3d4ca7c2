"""The full-image CLI end to end on three real ICDAR 2015 images, and on bad images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from eval import det_rec
from tests.conftest import encode

IC15 = Path(os.environ.get("IC15_TEST_DIR", Path(__file__).resolve().parents[3] / "shared"
                           / "data" / "IC15_test_even"))
IC15_IMAGES = IC15 / "images"


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    if not IC15_IMAGES.is_dir():
        pytest.skip(f"ICDAR 2015 test images not found at {IC15} (set IC15_TEST_DIR)")
    root = tmp_path_factory.mktemp("ic15")
    (root / "images").mkdir()
    (root / "gts").mkdir()
    for n in (2, 4, 6):
        shutil.copy(IC15_IMAGES / f"img_{n}.jpg", root / "images")
        shutil.copy(IC15 / "gts" / f"gt_img_{n}.txt", root / "gts")
    return root


def test_cli_on_three_real_images(three, tmp_path, ppocr_det_path, ppocr_rec_path):
    predictions, report_path, vis = tmp_path / "p.json", tmp_path / "r.json", tmp_path / "vis"
    code = det_rec.main(["--images", str(three / "images"), "--gts", str(three / "gts"),
                         "--predictions", str(predictions), "--report", str(report_path),
                         "--vis", str(vis), "--det", str(ppocr_det_path),
                         "--rec", str(ppocr_rec_path)])
    assert code == 0
    words = json.loads(predictions.read_text())
    assert sorted(words) == ["img_2.jpg", "img_4.jpg", "img_6.jpg"]
    for entries in words.values():
        for entry in entries:
            assert set(entry) == {"points", "text", "confidence"}
            assert len(entry["points"]) == 4 and entry["text"]
            assert 0 <= entry["confidence"] <= 1
            for x, y in entry["points"]:
                assert 0 <= x <= 1280 and 0 <= y <= 720
    report = json.loads(report_path.read_text())
    assert report["images"] == 3 and report["failed"] == 0
    det, e2e = report["detection"], report["end_to_end"]
    assert det["matched"] > 0 and "ICDAR 2015" in det["protocol"]
    assert 0 < e2e["correct"] <= det["matched"]
    assert det["detections"] <= sum(len(v) for v in words.values())  # less those in ###
    assert sum(row["matched"] for row in report["per_image"]) == det["matched"]
    # img_2 shows a poster reading "JOINT PAIN": both words are read and located.
    found = {e["text"].lower() for e in words["img_2.jpg"]}
    assert {"joint", "pain"} <= found
    for name in ("img_2", "img_4", "img_6"):
        with Image.open(vis / f"{name}.png") as drawn:
            assert drawn.size == (1280, 720)


def test_bad_images_are_counted_failures(tmp_path, ppocr_det_path, ppocr_rec_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (images / "big.png").write_bytes(encode(Image.new("RGB", (1200, 1000), "white")))
    (images / "blank.png").write_bytes(encode(Image.new("RGB", (400, 300), "white")))
    predictions, report = tmp_path / "p.json", tmp_path / "r.json"
    assert det_rec.main(["--images", str(images), "--predictions", str(predictions),
                         "--report", str(report), "--max-pixels", "1000000",
                         "--det", str(ppocr_det_path), "--rec", str(ppocr_rec_path)]) == 0
    assert json.loads(predictions.read_text()) == {"blank.png": []}
    data = json.loads(report.read_text())
    assert data["failed"] == 2
    reasons = {f["image"]: f["reason"] for f in data["failures"]}
    assert "over the cap of 1000000" in reasons["big.png"]
    assert "not a decodable image" in reasons["broken.jpg"]
    # Its own earlier outputs (marked here) are replaced by a second run.
    predictions.write_text(json.dumps({"blank.png": [], "earlier.png": []}))
    report.write_text(json.dumps({**data, "earlier": True}))
    assert det_rec.main(["--images", str(images), "--predictions", str(predictions),
                         "--report", str(report), "--max-pixels", "1000000",
                         "--det", str(ppocr_det_path), "--rec", str(ppocr_rec_path)]) == 0
    assert json.loads(predictions.read_text()) == {"blank.png": []}
    assert "earlier" not in json.loads(report.read_text())


def test_entries_that_are_not_image_files_are_listed_with_their_reason(tmp_path, ppocr_det_path,
                                                                      ppocr_rec_path):
    import os

    images = tmp_path / "images"
    images.mkdir()
    (images / "blank.png").write_bytes(encode(Image.new("RGB", (400, 300), "white")))
    (images / "still.gif").write_bytes(encode(Image.new("P", (300, 200), 0), "GIF"))
    os.symlink("loop_b.jpg", images / "loop_a.jpg")
    os.symlink("loop_a.jpg", images / "loop_b.jpg")
    os.symlink(tmp_path / "gone.png", images / "dangling.png")
    os.mkfifo(images / "pipe.png")
    (images / "folder.jpg").mkdir()
    os.symlink("/dev/zero", images / "zero.png")
    (images / "notes.txt").write_text("not named like an image: not listed")
    predictions, report = tmp_path / "p.json", tmp_path / "r.json"
    assert det_rec.main(["--images", str(images), "--predictions", str(predictions),
                         "--report", str(report), "--det", str(ppocr_det_path),
                         "--rec", str(ppocr_rec_path)]) == 0
    assert json.loads(predictions.read_text()) == {"blank.png": [], "still.gif": []}
    data = json.loads(report.read_text())
    reasons = {f["image"]: f["reason"] for f in data["failures"]}
    assert reasons == {"loop_a.jpg": "a symbolic link that loops",
                       "loop_b.jpg": "a symbolic link that loops",
                       "dangling.png": "a dangling symbolic link",
                       "pipe.png": "a FIFO, not an image file",
                       "folder.jpg": "a folder, not an image file",
                       "zero.png": "a character device, not an image file"}
    assert data["failed"] == 6 and data["images"] == 8 and data["recognised_images"] == 2


def test_missing_ground_truth_is_one_clear_error(tmp_path, capsys):
    images, gts = tmp_path / "images", tmp_path / "gts"
    images.mkdir()
    gts.mkdir()
    (images / "img_1.png").write_bytes(encode(Image.new("RGB", (64, 64))))
    code = det_rec.main(["--images", str(images), "--gts", str(gts), "--predictions",
                         str(tmp_path / "p.json")])
    assert code == 1
    assert "no ground truth for 1 images (gt_img_1.txt)" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("coordinate", ["nan", "inf", "-inf"])
def test_ground_truth_with_a_coordinate_that_is_not_finite_is_refused_before_any_work(
        tmp_path, capsys, coordinate):
    images, gts = tmp_path / "images", tmp_path / "gts"
    images.mkdir()
    gts.mkdir()
    (images / "img_1.png").write_bytes(encode(Image.new("RGB", (64, 64))))
    (gts / "gt_img_1.txt").write_text(f"1,2,3,2,3,4,1,4,ok\n1,2,{coordinate},2,3,4,1,4,word\n")
    code = det_rec.main(["--images", str(images), "--gts", str(gts), "--predictions",
                         str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 1 and "gt_img_1.txt:2: not an ICDAR 2015 line" in err and "finite" in err
    assert "Traceback" not in err and not (tmp_path / "p.json").exists()


def test_outputs_never_overwrite_inputs_or_foreign_files(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    photo = images / "img_1.png"
    photo.write_bytes(encode(Image.new("RGB", (64, 64))))
    before = photo.read_bytes()
    notes = tmp_path / "notes.json"
    notes.write_text('{"keep": 1}')
    cases = [
        (["--predictions", str(photo)], "is one of the inputs; --predictions"),
        (["--predictions", str(tmp_path / "p.json"), "--report", str(tmp_path / "p.json")],
         "--report and --predictions name the same file"),
        (["--predictions", str(tmp_path / "p.json"), "--vis", str(images)],
         "not empty and not written by det_rec; --vis must name a new or empty folder"),
        (["--predictions", str(notes)], f"{notes}: exists and was not written by eval.det_rec"),
        (["--predictions", str(tmp_path / "p.json"), "--report", str(notes)],
         f"{notes}: exists and was not written by eval.det_rec"),
    ]
    for extra, message in cases:
        assert det_rec.main(["--images", str(images), *extra]) == 1
        assert message in capsys.readouterr().err
    assert photo.read_bytes() == before and sorted(images.iterdir()) == [photo]
    assert not (tmp_path / "p.json").exists() and notes.read_text() == '{"keep": 1}'
