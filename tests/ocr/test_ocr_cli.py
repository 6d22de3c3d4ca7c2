"""``python -m ocr``: photos in (files, folders, globs), lines and words out, as the offline
pipeline reads them; a bad image is reported and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ocr.__main__ import main
from pipeline.ocr import open_pipeline
from preprocess.image import decode_rgb
from tests.conftest import encode, render_line


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two photos of rendered lines on a grey page, one of them upside down."""
    folder = tmp_path_factory.mktemp("photos")
    for name, words, turn in (("shop.jpg", ["OPEN", "DAILY"], False),
                              ("exit.png", ["EXIT", "2026"], True)):
        line, _ = render_line(words)
        page = np.full((300, 520, 3), 230, np.uint8)
        page[120:120 + line.shape[0], 40:40 + line.shape[1]] = line
        if turn:
            page = np.ascontiguousarray(page[::-1, ::-1])
        (folder / name).write_bytes(encode(Image.fromarray(page), name.split(".")[1].upper()
                                           .replace("JPG", "JPEG")))
    return folder


def test_json_lines_and_words_equal_the_offline_pipeline(photos, capsys):
    assert main([str(photos), "--json", "--threads", "1"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["image"] for a in answers] == [str(photos / "exit.png"), str(photos / "shop.jpg")]
    with open_pipeline(threads=1) as pipeline:
        for answer in answers:
            (result,) = pipeline([decode_rgb((photos / answer["image"]).read_bytes())])
            assert [w for line in answer["lines"] for w in line["words"]] == \
                [w.as_json() for w in result.words]
    texts = [" ".join(line["text"] for line in a["lines"]) for a in answers]
    assert texts == ["EXIT 2026", "OPEN DAILY"]  # the upside-down photo is turned back
    assert all(len(line["words"]) == 2 for a in answers for line in a["lines"])


def test_text_output_with_a_glob_and_a_bad_image(photos, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main([str(photos / "*.jpg"), str(bad), "--threads", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{photos / 'shop.jpg'}: 1 lines, 2 words")
    assert "OPEN DAILY" in out and "exit.png" not in out
    assert f"error: {bad}: not a decodable image" in err
    assert "1 of 2 images could not be read" in err


def test_a_name_matching_nothing_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none*.jpg")]) == 1
    err = capsys.readouterr().err.strip()
    assert "no such file or folder, and no image matches it" in err and "\n" not in err
