"""Checkpoint loading: layouts, gate order, wrappers, and the errors people will hit."""

from __future__ import annotations

import pytest
import torch

from common.errors import ToolchainError
from models.checkpoint import (
    detect_layout,
    load_checkpoint,
    read_description,
    read_state_dict,
    reorder_gates,
    save_checkpoint,
)
from models.registry import build_model, spec_for_arch

CRNN = spec_for_arch("crnn")


def test_reorder_gates_round_trip_and_block_order():
    hidden = 3
    tensor = torch.arange(4 * hidden * 2, dtype=torch.float32).reshape(4 * hidden, 2)
    i, f, g, o = tensor.chunk(4)
    npu = reorder_gates(tensor, "ifgo", "igfo")
    assert torch.equal(npu, torch.cat([i, g, f, o]))
    assert torch.equal(reorder_gates(npu, "igfo", "ifgo"), tensor)


def test_reorder_gates_rejects_bad_orders():
    with pytest.raises(ValueError):
        reorder_gates(torch.zeros(8), "abcd")
    with pytest.raises(ValueError):
        reorder_gates(torch.zeros(6), "igfo")


def test_modelzoo_layout_with_gate_reorder_equals_meijieru(crnn_checkpoints):
    """The split forward/backward LSTMs, reordered, compute exactly what the BiLSTM does."""
    imgs = torch.rand(2, 1, 32, 100) * 2 - 1
    reference = load_checkpoint(crnn_checkpoints["meijieru"], CRNN)
    modelzoo = load_checkpoint(crnn_checkpoints["modelzoo"], CRNN, gate_order="igfo")
    assert modelzoo.layout == "modelzoo"
    with torch.no_grad():
        expected, actual = reference(imgs), modelzoo(imgs)
    assert actual.shape == (26, 2, 37)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Without the reorder the gates are scrambled and the logits differ.
    scrambled = load_checkpoint(crnn_checkpoints["modelzoo"], CRNN, gate_order="ifgo")
    with torch.no_grad():
        assert (scrambled(imgs) - expected).abs().max() > 1e-2


def test_wrappers_and_prefixes_are_removed(crnn_checkpoints):
    state = read_state_dict(crnn_checkpoints["modelzoo"])
    assert all(not k.startswith("module.") for k in state)
    assert detect_layout(state, ("meijieru", "modelzoo")) == "modelzoo"
    assert detect_layout(state, ("meijieru",)) == "meijieru"
    assert (
        detect_layout(read_state_dict(crnn_checkpoints["meijieru"]), ("meijieru", "modelzoo"))
        == "meijieru"
    )


def test_real_nano_weights_load_on_cpu(nano_weights):
    model = load_checkpoint(nano_weights, spec_for_arch("nano-ocr"))
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 128)).shape == (33, 1, 66)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such checkpoint file"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a PyTorch checkpoint"),
        (lambda p: torch.save({"epoch": 3}, p), "not a state dict"),
        (lambda p: torch.save([torch.zeros(1)], p), "holds a list"),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), "cannot be unpickled safely"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, make, message):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(ToolchainError, match=message):
        load_checkpoint(path, CRNN)


def test_a_truncated_checkpoint_is_named_not_taken_for_one_without_description(tmp_path,
                                                                               capsys):
    """A checkpoint cut short (a full disk, a copy stopped halfway) is unreadable, and says so;
    it used to read as 'carries no model description; give --arch'."""
    from convert import pth2onnx

    whole = tmp_path / "whole.pth"
    save_checkpoint(whole, build_model(CRNN), CRNN)
    assert read_description(whole) == CRNN
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ToolchainError, match=r"cut.pth: not a PyTorch checkpoint \(Runtime"):
        read_description(cut)
    assert pth2onnx.main([str(cut), str(tmp_path / "m.onnx")]) != 0
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
    # A checkpoint that pickles objects still asks for --arch (and --trust-checkpoint).
    pickled = tmp_path / "pickled.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)
    assert read_description(pickled) is None


def test_wrong_arch_names_keys_and_suggests_the_fit(nano_weights):
    with pytest.raises(ToolchainError) as info:
        load_checkpoint(nano_weights, CRNN)
    text = str(info.value)
    assert "missing keys: cnn.conv0.weight" in text
    assert "unexpected keys: cnn.0.weight" in text
    assert "fits --arch nano-ocr" in text


def test_wrong_layout_suggests_the_other_layout(crnn_checkpoints):
    with pytest.raises(ToolchainError, match="fits --arch crnn --rnn-layout modelzoo"):
        load_checkpoint(crnn_checkpoints["modelzoo"], CRNN, rnn_layout="meijieru")


def test_shape_mismatch_is_named(tmp_path, crnn_checkpoints):
    state = read_state_dict(crnn_checkpoints["meijieru"])
    state["rnn.1.embedding.weight"] = torch.zeros(40, 512)
    torch.save(state, tmp_path / "c.pth")
    with pytest.raises(ToolchainError, match=r"rnn.1.embedding.weight \(40, 512\) vs \(37, 512\)"):
        load_checkpoint(tmp_path / "c.pth", CRNN)
