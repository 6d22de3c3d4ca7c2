"""Session-wide fixtures: real weights, small exported models, tiny lmdbs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import reorder_gates
from models.registry import build_model, spec_for_arch
from preprocess.lmdb_reader import default_test_set

IIIT5K = default_test_set()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial running statistics so exports test them too."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def meijieru_to_modelzoo(state: dict[str, torch.Tensor]) -> dict:
    """Re-save a meijieru crnn state dict the way ModelZoo NPU training does.

    ``rnn.K.rnn.*_l0`` -> ``rnn.K.fw_rnn.*_l0``; ``*_l0_reverse`` -> ``rnn.K.bw_rnn.*_l0``;
    LSTM gate blocks in Ascend's (i, g, f, o) order; ``module.`` prefixes; wrapped in
    ``{"state_dict": ...}``.
    """
    out = {}
    for key, value in state.items():
        if ".rnn.weight" in key or ".rnn.bias" in key:
            direction = "bw_rnn" if key.endswith("_reverse") else "fw_rnn"
            key = key.removesuffix("_reverse").replace(".rnn.", f".{direction}.", 1)
            value = reorder_gates(value, "ifgo", "igfo")
        out["module." + key] = value
    return {"state_dict": out, "epoch": 3}


@pytest.fixture(scope="session")
def nano_weights() -> Path:
    """The real nano-ocr 0.1.0 checkpoint, fetched into the cache once."""
    from models.weights import fetch

    return fetch("nano-ocr")


@pytest.fixture(scope="session")
def crnn_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight crnn checkpoints of one model, saved in both layouts."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = randomise(build_model(spec_for_arch("crnn"), "meijieru"))
    state = model.state_dict()
    paths = {"meijieru": folder / "crnn_meijieru.pth", "modelzoo": folder / "crnn_modelzoo.pth"}
    torch.save(state, paths["meijieru"])
    torch.save(meijieru_to_modelzoo(state), paths["modelzoo"])
    return paths


@pytest.fixture(scope="session")
def exported(tmp_path_factory, nano_weights, crnn_checkpoints) -> dict[str, Path]:
    """ONNX exports (convert.pth2onnx) of nano-ocr (real weights) and crnn in both layouts."""
    from convert.pth2onnx import export_onnx
    from models.checkpoint import load_checkpoint

    folder = tmp_path_factory.mktemp("onnx")
    nano_spec, crnn_spec = spec_for_arch("nano-ocr"), spec_for_arch("crnn")
    return {
        "nano-ocr": export_onnx(load_checkpoint(nano_weights, nano_spec), nano_spec,
                                folder / "nano.onnx"),
        "crnn-meijieru": export_onnx(load_checkpoint(crnn_checkpoints["meijieru"], crnn_spec),
                                     crnn_spec, folder / "crnn_meijieru.onnx"),
        "crnn-modelzoo": export_onnx(
            load_checkpoint(crnn_checkpoints["modelzoo"], crnn_spec, gate_order="igfo"),
            crnn_spec, folder / "crnn_modelzoo.onnx"),
    }


@pytest.fixture(scope="session")
def fixed_models(tmp_path_factory, exported) -> dict[str, Path]:
    """The exports above after convert.fix."""
    from convert.fix import fix_model

    folder = tmp_path_factory.mktemp("fixed")
    out = {}
    for name, path in exported.items():
        out[name] = folder / f"{name}_fixed.onnx"
        fix_model(path, out[name])
    return out


def encode(image, fmt: str = "PNG", **params) -> bytes:
    """Encoded bytes of a Pillow image."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def write_lmdb(path: Path, entries: dict[int, tuple[bytes | None, bytes | None]],
               num_samples: int | None) -> Path:
    """Write an IIIT5K-style lmdb: ``{index: (image bytes, label bytes)}``, None = key absent."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        if num_samples is not None:
            txn.put(b"num-samples", str(num_samples).encode())
        for index, (image, label) in entries.items():
            if image is not None:
                txn.put(b"image-%09d" % index, image)
            if label is not None:
                txn.put(b"label-%09d" % index, label)
    env.close()
    return path


def word_image(text: str, width: int = 100, height: int = 32, mode: str = "L"):
    """A dark word on a light background, drawn with Pillow's default font."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (width, height), 235)
    ImageDraw.Draw(image).text((4, height // 4), text, fill=20)
    return image.convert(mode)


@pytest.fixture
def tiny_lmdb(tmp_path) -> Path:
    """Ten indices: PNG, JPEG, grey, RGBA, palette, 16-bit and very wide images that decode,
    one corrupt image, one missing label, and num-samples claiming one index too many."""
    import numpy as np
    from PIL import Image

    sixteen = Image.fromarray((np.linspace(0, 65535, 64 * 16).reshape(16, 64)).astype(np.uint16))
    rgba = word_image("rgba", 90, 30, "RGBA")
    entries = {
        1: (encode(word_image("png", 100, 32, "RGB")), b"png"),
        2: (encode(word_image("Jpeg", 120, 40, "RGB"), "JPEG", quality=90), b"Jpeg"),
        3: (encode(word_image("grey", 128, 32)), b"grey"),
        4: (encode(rgba), b"rgba"),
        5: (encode(word_image("pal", 64, 24, "RGB").convert("P")), b"pal"),
        6: (encode(sixteen), b"sixteen"),
        7: (b"\x89PNG\r\n\x1a\n this is not an image", b"corrupt"),
        8: (encode(word_image("nolabel")), None),
        9: (encode(word_image("wide", 2600, 20)), b"wide"),
    }
    return write_lmdb(tmp_path / "tiny_lmdb", entries, num_samples=10)


@pytest.fixture(scope="session")
def ppocr_rec_path() -> Path:
    """The real PP-OCRv4 recogniser (RapidOCR 1.4.4 wheel), fetched into the cache once."""
    from models.weights import fetch

    return fetch("ppocr-v4-rec")


@pytest.fixture(scope="session")
def ppocr_det_path() -> Path:
    """The real PP-OCRv4 DB text detector (RapidOCR 1.4.4 wheel), fetched once."""
    from models.weights import fetch

    return fetch("ppocr-v4-det")


def render_line(words: list[str], size: int = 40, gap: int = 30, margin: int = 12):
    """Black words on white, drawn one by one with Pillow's default font at ``size``.

    Returns:
        The uint8 RGB pixels and each word's ink box ``(x0, y0, x1, y1)`` in pixels.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), w, font=font)[2] for w in words]
    width = 2 * margin + sum(widths) + gap * (len(words) - 1)
    image = Image.new("RGB", (width, size + 2 * margin), "white")
    draw = ImageDraw.Draw(image)
    boxes, x = [], margin
    for word, advance in zip(words, widths):
        draw.text((x, margin), word, fill="black", font=font)
        boxes.append(draw.textbbox((x, margin), word, font=font))
        x += advance + gap
    return np.asarray(image), boxes


#: The labels of the tiny classifier of :func:`tiny`.
CLASSIFIER_LABELS = ("cat", "dog", "fish")


class TinyClassifier(torch.nn.Module):
    """3 classes from a 3x24x32 RGB image; logits out (no softmax in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, TinyClassifier]:
    """A tiny torch classifier exported to ONNX with a dynamic batch."""
    model = TinyClassifier().eval()
    path = tmp_path_factory.mktemp("cls") / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 24, 32), str(path), input_names=["pixels"],
                      output_names=["scores"], dynamic_axes={"pixels": {0: "n"},
                                                             "scores": {0: "n"}},
                      dynamo=False)
    return path, model
