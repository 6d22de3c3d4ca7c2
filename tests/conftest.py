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
def ppocr_v6_rec_path() -> Path:
    """The real PP-OCRv6 small recogniser (RapidOCR 3.10.0 wheel), fetched into the cache once."""
    from models.weights import fetch

    return fetch("ppocr-v6-rec")


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


#: The characters of :func:`tiny_ctc_onnx`'s classes after the blank (nano-ocr's).
TINY_CTC_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.- "


def build_tiny_ctc_graph(seed: int = 0, channels: int = 16):
    """A small CTC recogniser written node by node in ONNX opset 11, shaped like PP-OCR's
    (Conv + BatchNorm + hard-swish, ``auto_pad`` SAME_UPPER Conv and MaxPool as Paddle2ONNX
    writes them, an AveragePool to height 1, a layer norm written out in ReduceMean/Pow/Sqrt,
    a GELU written with Erf, a reshape through Shape/Slice/Concat, MatMul head, Softmax):
    input ``x`` float32 ``[N, 3, 16, W]``, output ``probs`` ``[N, W // 8, 66]``. Random
    weights from ``seed``; the model description is not attached (see :func:`tiny_ctc_onnx`).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    classes = len(TINY_CTC_ALPHABET) + 1
    c = channels
    weights = {
        "c1.w": rng.normal(0, 0.3, (c, 3, 3, 3)), "c1.b": rng.normal(0, 0.1, c),
        "bn.scale": rng.uniform(0.5, 1.5, c), "bn.bias": rng.normal(0, 0.1, c),
        "bn.mean": rng.normal(0, 0.1, c), "bn.var": rng.uniform(0.5, 1.5, c),
        "c2.w": rng.normal(0, 0.2, (c, c, 2, 2)),
        "c3.w": rng.normal(0, 0.2, (c, c, 3, 3)), "c3.b": rng.normal(0, 0.1, c),
        "ln.gamma": rng.uniform(0.5, 1.5, c), "ln.beta": rng.normal(0, 0.1, c),
        "fc.w": rng.normal(0, 0.3, (c, c)), "fc.b": rng.normal(0, 0.1, c),
        "head.w": rng.normal(0, 0.5, (c, classes)), "head.b": rng.normal(0, 0.1, classes),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    scalars = {"eps": 1e-5, "two": 2.0, "half": 0.5, "one": 1.0, "rsqrt2": 0.70710678}
    initializers += [numpy_helper.from_array(np.array(v, np.float32), k)
                     for k, v in scalars.items()]
    initializers += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                     {"s0": [0], "s2": [2], "minus1": [-1]}.items()]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1.w", "c1.b"], ["a1"], kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1], name="conv1"),
        n("BatchNormalization", ["a1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["a2"],
          epsilon=1e-5, name="bn1"),
        n("HardSigmoid", ["a2"], ["a3"], alpha=1 / 6, beta=0.5),
        n("Mul", ["a2", "a3"], ["a4"]),
        n("Conv", ["a4", "c2.w"], ["a5"], kernel_shape=[2, 2], auto_pad="SAME_UPPER",
          name="conv2"),
        n("Relu", ["a5"], ["a6"]),
        n("MaxPool", ["a6"], ["a7"], kernel_shape=[2, 2], strides=[1, 1],
          auto_pad="SAME_UPPER"),
        n("Conv", ["a7", "c3.w", "c3.b"], ["a8"], kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1], name="conv3"),
        n("AveragePool", ["a8"], ["a9"], kernel_shape=[4, 2], strides=[4, 2]),
        n("Squeeze", ["a9"], ["b1"], axes=[2]),
        n("Transpose", ["b1"], ["b2"], perm=[0, 2, 1]),  # [N, T, C]
        n("ReduceMean", ["b2"], ["m1"], axes=[-1]),
        n("Sub", ["b2", "m1"], ["d1"]),
        n("Pow", ["d1", "two"], ["d2"]),
        n("ReduceMean", ["d2"], ["v1"], axes=[-1]),
        n("Add", ["v1", "eps"], ["v2"]),
        n("Sqrt", ["v2"], ["v3"]),
        n("Div", ["d1", "v3"], ["n1"]),
        n("Mul", ["n1", "ln.gamma"], ["n2"]),
        n("Add", ["n2", "ln.beta"], ["n3"]),
        n("Shape", ["n3"], ["sh"]),
        n("Slice", ["sh", "s0", "s2"], ["nt"]),  # [N, T]
        n("Concat", ["nt", "minus1"], ["shape3"], axis=0),
        n("Reshape", ["n3", "shape3"], ["r1"]),
        n("MatMul", ["r1", "fc.w"], ["f1"]),
        n("Add", ["f1", "fc.b"], ["f2"]),
        n("Mul", ["f2", "rsqrt2"], ["g1"]),
        n("Erf", ["g1"], ["g2"]),
        n("Add", ["g2", "one"], ["g3"]),
        n("Mul", ["f2", "g3"], ["g4"]),
        n("Mul", ["g4", "half"], ["g5"]),
        n("Add", ["g5", "n3"], ["g6"]),
        n("MatMul", ["g6", "head.w"], ["h1"]),
        n("Add", ["h1", "head.b"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny_ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "T", classes])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                              producer_name="tests")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_ctc_spec():
    """The description :func:`tiny_ctc_onnx` carries (arch ``tiny-ctc``, not in the
    registry): BGR, PP-OCR's normalisation, probabilities ``[N, W // 8, classes]``."""
    from models.spec import ModelSpec

    return ModelSpec(arch="tiny-ctc", alphabet=TINY_CTC_ALPHABET, input_name="x",
                     output_name="probs", height=16, channels=3, channel_order="bgr",
                     width_policy="keep-ratio", width=64, min_width=32, max_width=160,
                     output_layout="NTC", output_kind="probabilities", downsample=8,
                     frame_offset=0, min_input_width=8)


@pytest.fixture(scope="session")
def tiny_ctc_onnx(tmp_path_factory) -> Path:
    """:func:`build_tiny_ctc_graph` with :func:`tiny_ctc_spec` in its metadata: an ONNX CTC
    recogniser from elsewhere that carries this toolchain's description."""
    import onnx

    model = build_tiny_ctc_graph()
    onnx.helper.set_model_props(model, tiny_ctc_spec().to_metadata())
    path = tmp_path_factory.mktemp("tiny_ctc") / "tiny_ctc.onnx"
    onnx.save(model, str(path))
    return path
