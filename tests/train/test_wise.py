"""train.wise: the weight-space ensemble of a fine-tuned checkpoint and its initial model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import ToolchainError
from models.checkpoint import read_checkpoint, read_description, read_state_dict
from train import __main__ as train_cli
from train import wise
from train.trainer import initial_model


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, synth_words) -> Path:
    """nano-ocr after 3 updates on 80 rendered words: train's model.pth."""
    out = tmp_path_factory.mktemp("ft") / "run"
    assert train_cli.main(["--init", "nano-ocr", "--train", str(synth_words), "--out", str(out),
                           "--epochs", "1", "--batch-size", "8", "--max-steps", "3",
                           "--workers", "1", "--lr", "1e-3"]) == 0
    return out / "model.pth"


def test_train_records_its_initial_model_and_last_pth_interpolates_too(tmp_path, fine_tuned):
    last = fine_tuned.parent / "last.pth"
    assert read_checkpoint(fine_tuned)["init"] == "nano-ocr"
    assert read_checkpoint(last)["init"] == "nano-ocr"
    # last.pth (with its optimiser state beside the weights) is taken as well
    assert wise.main([str(last), str(tmp_path / "w.pth"), "--alpha", "0.7"]) == 0
    assert read_description(tmp_path / "w.pth") == read_description(last)


def test_the_output_is_the_interpolation_and_goes_through_the_toolchain(tmp_path, fine_tuned,
                                                                       capsys):
    out = tmp_path / "wise.pth"
    assert wise.main([str(fine_tuned), str(out), "--alpha", "0.25"]) == 0
    assert "0.25 x" in capsys.readouterr().out
    start = initial_model("nano-ocr", None, None)[0].state_dict()
    tuned = read_state_dict(fine_tuned)
    mixed = read_state_dict(out)
    moved = [k for k in tuned if tuned[k].is_floating_point()
             and not torch.equal(tuned[k], start[k])]
    assert moved  # fine-tuning changed something, so the check below can fail
    for name, value in mixed.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * start[name] + 0.25 * tuned[name])
        else:
            assert torch.equal(value, tuned[name])
    assert read_description(out) == read_description(fine_tuned)
    assert read_checkpoint(out)[wise.WISE_KEY]["alpha"] == 0.25
    from convert import pth2onnx

    assert pth2onnx.main([str(out), str(tmp_path / "wise.onnx")]) == 0
    # Its own output may be replaced; alpha 1 gives the fine-tuned weights back.
    assert wise.main([str(fine_tuned), str(out), "--alpha", "1"]) == 0
    again = read_state_dict(out)
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, fine_tuned, capsys):
    out = tmp_path / "wise.pth"
    for alpha in ("0", "1.5", "-0.2"):
        assert wise.main([str(fine_tuned), str(out), "--alpha", alpha]) != 0
        assert "must be above 0 and at most 1" in capsys.readouterr().err
    assert wise.main([str(tmp_path / "none.pth"), str(out), "--alpha", "0.5"]) != 0
    assert "no such checkpoint file" in capsys.readouterr().err
    assert wise.main([str(fine_tuned), str(fine_tuned), "--alpha", "0.5"]) != 0
    assert "is the fine-tuned checkpoint" in capsys.readouterr().err
    assert not out.exists()
    # A file the tool did not write is left as it is.
    out.write_bytes(b"someone else's")
    assert wise.main([str(fine_tuned), str(out), "--alpha", "0.5"]) != 0
    assert "was not written by train.wise" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's"


def test_another_architecture_or_charset_is_refused(tmp_path, fine_tuned, capsys):
    from models.checkpoint import save_checkpoint

    small, spec, _ = initial_model(None, "crnn-small", None)
    other = tmp_path / "small.pth"
    save_checkpoint(other, small, spec)
    assert wise.main([str(fine_tuned), str(tmp_path / "w.pth"), "--alpha", "0.5",
                      "--init", str(other)]) != 0
    assert "not the same architecture" in capsys.readouterr().err
    # A checkpoint that records no initial model needs --init.
    assert wise.main([str(other), str(tmp_path / "w.pth"), "--alpha", "0.5"]) != 0
    assert "give --init" in capsys.readouterr().err
    # A classifier whose charset changed has no initial counterpart.
    start = {"fc.weight": torch.zeros(65, 8), "fc.bias": torch.zeros(65)}
    tuned = {"fc.weight": torch.ones(40, 8), "fc.bias": torch.ones(40)}
    with pytest.raises(ToolchainError, match=r"fc\.(weight|bias): \(65.*\(40"):
        wise.interpolate(start, tuned, 0.5)
