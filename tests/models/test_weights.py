"""models.weights: the registry's weights, the PP-OCRv4 recogniser's description, the CLI."""

from __future__ import annotations

import onnx
import pytest

from common.errors import ToolchainError
from convert import atc
from models import weights
from models.onnx_file import read_onnx_spec


@pytest.fixture(scope="session")
def ppocr_rec():
    return weights.fetch("ppocr-v4-rec")


def test_ppocr_v4_rec_carries_our_description(ppocr_rec):
    spec = read_onnx_spec(ppocr_rec)
    model = onnx.load(str(ppocr_rec), load_external_data=False)
    original = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    assert spec.alphabet == "".join(original) + " " and spec.num_classes == 6625
    assert (spec.blank, spec.input_name, spec.output_name) == (0, "x", "softmax_11.tmp_0")
    assert model.graph.input[0].name == spec.input_name
    assert model.graph.output[0].name == spec.output_name
    assert (spec.channels, spec.channel_order, spec.height) == (3, "bgr", 48)
    assert (spec.output_layout, spec.output_kind, spec.frames(320)) == ("NTC", "probabilities", 40)
    assert spec.charset.encode("Ab 1") == [original.index("A") + 1, original.index("b") + 1,
                                            6624, original.index("1") + 1]


def test_cli_path_and_fetch_print_the_file(ppocr_rec, capsys):
    assert weights.main(["path", "ppocr-v4-rec"]) == 0
    assert weights.main(["fetch", "ppocr-v4-rec"]) == 0  # cached: no download
    out = capsys.readouterr().out.split()
    assert out == [str(ppocr_rec), str(ppocr_rec)]


def test_a_recogniser_without_a_charset_is_refused(tmp_path, fixed_models):
    with pytest.raises(ToolchainError, match="no 'character' metadata"):
        weights.describe_ppocr_rec(fixed_models["nano-ocr"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_atc_builds_the_ppocr_argv(ppocr_rec, tmp_path, capsys):
    assert atc.main(["--model", str(ppocr_rec), "--output", str(tmp_path / "om" / "ppocr"),
                     "--soc-version", "Ascend310P3", "--dry-run"]) == 0
    assert "--input_shape=x:1~16,3,48,96~480" in capsys.readouterr().out


def test_weights_without_a_source(capsys):
    with pytest.raises(SystemExit):
        weights.main(["fetch", "crnn"])  # argparse: crnn has no public weights
    assert "invalid choice: 'crnn'" in capsys.readouterr().err


def test_an_unwritable_cache_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CRNN_WEIGHTS_DIR", "/proc/crnn_toolchain_cache")
    assert weights.main(["fetch", "ppocr-v4-rec"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: /proc/crnn_toolchain_cache/ppocr_v4_rec.onnx: cannot be written")
    assert "\n" not in err


def test_a_cached_file_with_another_digest_is_not_replaced(tmp_path, monkeypatch, capsys):
    """A file at the cache path whose digest is not the expected one was not written by
    models.weights (it verifies before renaming into place): refused, left as it was."""
    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(tmp_path))
    target = weights.weights_path("nano-ocr")
    target.write_bytes(b"my own fine-tuned weights")
    assert weights.main(["fetch", "nano-ocr"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target}: exists and was not written by models.weights")
    assert "\n" not in err
    assert target.read_bytes() == b"my own fine-tuned weights"


def test_a_foreign_model_at_a_described_cache_path_is_neither_used_nor_replaced(
        tmp_path, monkeypatch, capsys, fixed_models):
    """ppocr-v4-rec's cache holds our described copy; a model from elsewhere at that path
    (here an ONNX model with its metadata stripped) is refused rather than read as PP-OCR."""
    import onnx

    monkeypatch.setenv("CRNN_WEIGHTS_DIR", str(tmp_path))
    target = weights.weights_path("ppocr-v4-rec")
    foreign = onnx.load(str(fixed_models["crnn-meijieru"]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(target))
    before = target.read_bytes()
    assert weights.main(["fetch", "ppocr-v4-rec"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target}: exists and was not written by models.weights")
    assert "\n" not in err and target.read_bytes() == before
