"""The page at ``/`` in a real headless browser (Debian's chromium through its chromedriver,
driven by selenium) against a real server with PP-OCRv6's detector and recogniser: upload a
photo, wait for the boxes, and check the words drawn are ``/ocr``'s answer."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serve.process import ServerProcess
from tests.serve.test_ocr_service import photos

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium/chromedriver on PATH: scripts/install_browser.sh installs "
                        "them (scripts/test.sh runs it)")
        pytest.skip("no chromium/chromedriver (bash scripts/install_browser.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    from models.weights import fetch

    det, rec = fetch("ppocr-v6-det"), fetch("ppocr-v6-rec")
    with ServerProcess(["--model", str(rec), "--det", str(det), "--name", "ppocr-v6",
                        "--max-pixels", "2000000"]) as running:
        yield running


def upload(driver, url: str, path: Path, endpoint: str | None = None) -> str:
    """Open the page, choose ``path`` (on ``endpoint``, else the page's default), wait for the
    answer; the status line's state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    if endpoint is not None:
        Select(driver.find_element(By.ID, "endpoint")).select_by_value(endpoint)
    driver.find_element(By.ID, "file").send_keys(str(path))
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 90).until(
        lambda _: status.get_attribute("data-state") in ("done", "error"))
    return status.get_attribute("data-state")


def results(driver) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    return [(li.get_attribute("data-text"), float(li.get_attribute("data-confidence")))
            for li in driver.find_elements(By.CSS_SELECTOR, "#results li")]


def test_a_photo_uploaded_in_the_page_shows_ocrs_words_as_boxes(browser, server, tmp_path):
    raw = photos()[0]
    path = tmp_path / "photo.jpg"
    path.write_bytes(raw)
    expected = httpx.post(server.url + "/ocr", content=raw, timeout=60).json()["words"]
    assert expected  # the photo holds text

    assert upload(browser, server.url, path) == "done", browser.find_element("id", "status").text
    shown = results(browser)
    assert [text for text, _ in shown] == [w["text"] for w in expected]
    assert [round(c, 4) for _, c in shown] == [round(w["confidence"], 4) for w in expected]
    canvas = browser.execute_script(
        "const c = document.getElementById('canvas');"
        "return [c.width, c.height, c.dataset.boxes];")
    width, height = Image.open(io.BytesIO(raw)).size
    assert canvas == [width, height, str(len(expected))]
    # a box's edge is drawn in the stroke colour on the photo
    x, y = expected[0]["points"][0]
    pixel = browser.execute_script(
        f"return Array.from(document.getElementById('canvas').getContext('2d')"
        f".getImageData({x}, {y}, 1, 1).data);")
    assert pixel[0] > 200 and pixel[1] < 80 and pixel[2] > 100, pixel
    page = browser.find_element("id", "model").text
    assert "ppocr-v6" in page and "onnxruntime" in page
    assert "answered in" in browser.find_element("id", "status").text


def test_a_word_crop_sent_to_service_and_a_bad_file_in_the_page(browser, server, tmp_path):
    from tests.serve.test_service import real_words

    crop = real_words(1)[0]
    path = tmp_path / "word.png"
    path.write_bytes(crop)
    expected = httpx.post(server.url + "/service", content=crop, timeout=60).json()
    assert upload(browser, server.url, path, "service") == "done"
    ((text, confidence),) = results(browser)
    assert text == expected["text"] and round(confidence, 4) == round(expected["confidence"], 4)

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    assert upload(browser, server.url, bad) == "error"
    message = browser.find_element("id", "status").text
    assert message.startswith("error 400:") and "accepted formats" in message
