"""Bad arguments and unwritable outputs: one line naming the path, checked before long work,
and nothing written on failure (the hardening issue's rows 10-13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convert import fix, pth2onnx, quantize
from eval import postprocess
from preprocess import parse_testdata


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def bad_outputs(tmp_path):
    """An existing folder, a path under a file, a path under /proc (unwritable even by root)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's")  # parse_testdata takes only empty or own folders
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"folder": folder, "under a file": a_file / "out.onnx",
            "under /proc": Path("/proc/crnn_toolchain_test/out.onnx")}


@pytest.mark.parametrize("case", ["folder", "under a file", "under /proc"])
def test_unwritable_outputs_are_one_line(case, bad_outputs, tmp_path, capsys, exported,
                                         fixed_models, nano_weights, tiny_lmdb):
    out = bad_outputs[case]
    calls = [
        lambda: pth2onnx.main([str(nano_weights), str(out), "--arch", "nano-ocr"]),
        lambda: fix.main([str(exported["nano-ocr"]), str(out)]),
        lambda: quantize.main([str(fixed_models["nano-ocr"]), str(out), "--calibration",
                               str(tiny_lmdb)]),
        lambda: parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(out),
                                     "--arch", "nano-ocr", "--workers", "1"]),
        lambda: postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                                  str(fixed_models["nano-ocr"]), "--report", str(out)]),
    ]
    for call in calls:
        assert call() == 1
        _one_line_error(capsys, str(out))


def test_failed_parity_writes_nothing(tmp_path, nano_weights, capsys):
    out = tmp_path / "nano.onnx"
    assert pth2onnx.main([str(nano_weights), str(out), "--arch", "nano-ocr",
                          "--tolerance", "0"]) == 1
    _one_line_error(capsys, f"{out}: ONNX Runtime differs from PyTorch", "nothing written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", ["99", "3"])
def test_an_unsupported_opset_is_refused_before_loading(tmp_path, opset, capsys):
    assert pth2onnx.main(["missing.pth", str(tmp_path / "o.onnx"), "--arch", "crnn",
                          "--opset", opset]) == 1
    _one_line_error(capsys, f"--opset {opset} is outside")


def _save(tmp_path, name, graph) -> str:
    path = tmp_path / name
    onnx.save(helper.make_model(graph), str(path))
    return str(path)


def test_fix_refuses_graphs_it_cannot_verify(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    add = _save(tmp_path, "add.onnx", helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 32, 8]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, 32, 8])]))
    ints = _save(tmp_path, "int.onnx", helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "id",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 1, 32, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 1, 32, 8])]))
    for source, message in ((empty, "holds no graph"), (add, "has 2 inputs (a, b)"),
                            (ints, "input 'x' is int64 of rank 4")):
        assert fix.main([str(source), str(tmp_path / "out.onnx")]) == 1
        _one_line_error(capsys, message)
    assert not (tmp_path / "out.onnx").exists()


def test_report_and_predictions_appear_together(tmp_path, tiny_lmdb, fixed_models, capsys,
                                                 monkeypatch):
    """A write error on the second file leaves neither: no new report beside old predictions."""
    out = tmp_path / "out"
    out.mkdir()
    report, predictions = out / "report.json", out / "predictions.csv"
    # Earlier outputs of the tool (it replaces only its own), marked so a change shows.
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--report", str(report),
                             "--predictions", str(predictions)]) == 0
    report.write_text(json.dumps({**json.loads(report.read_text()), "old": True}))
    predictions.write_text(predictions.read_text() + "0,old,old,1.0,1,100\n")
    old_report, old_predictions = report.read_text(), predictions.read_text()
    capsys.readouterr()
    real = type(report).write_text

    def failing(self, text, *args, **kwargs):
        if self.name.startswith(".predictions.csv.partial-"):
            raise OSError(28, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(report), "write_text", failing)
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--report", str(report),
                             "--predictions", str(predictions)]) == 1
    _one_line_error(capsys, f"{predictions}: cannot be written (No space left on device)")
    assert report.read_text() == old_report and predictions.read_text() == old_predictions
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "report.json"]
    monkeypatch.undo()
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--report", str(report),
                             "--predictions", str(predictions)]) == 0
    assert json.loads(report.read_text())["scored"] == 7
    assert predictions.read_text().count("\n") == 8
    assert np.isfinite(json.loads(report.read_text())["accuracy"])


def test_a_bad_beam_width_is_refused_before_inference(tmp_path, tiny_lmdb, fixed_models, capsys):
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--decoder", "beam",
                             "--beam-width", "0", "--report", str(tmp_path / "r.json")]) == 1
    _one_line_error(capsys, "--beam-width must be >= 1, got 0")
    assert not (tmp_path / "r.json").exists()


def test_files_the_tool_did_not_write_are_not_overwritten(tmp_path, tiny_lmdb, fixed_models,
                                                          capsys):
    notes = tmp_path / "notes.csv"
    notes.write_text("my own notes\n")
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--predictions", str(notes)]) == 1
    _one_line_error(capsys, f"{notes}: exists and was not written by eval.postprocess")
    assert notes.read_text() == "my own notes\n"
    config = tmp_path / "config.json"
    config.write_text('{"keep": 1}')
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--report", str(config)]) == 1
    _one_line_error(capsys, f"{config}: exists and was not written by eval.postprocess")
    assert config.read_text() == '{"keep": 1}'


def test_model_writers_replace_only_models_this_toolchain_wrote(tmp_path, capsys, exported,
                                                                fixed_models, nano_weights,
                                                                tiny_lmdb):
    """pth2onnx, fix and quantize refuse an existing file they did not write, a valid ONNX
    model from elsewhere (no description in its metadata) as much as any other file, and
    leave it as it was; their own earlier output is replaced by a second run."""
    theirs = onnx.load(str(exported["nano-ocr"]))
    del theirs.metadata_props[:]
    foreign_model = tmp_path / "theirs.onnx"
    onnx.save(theirs, str(foreign_model))
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    calls = {
        "pth2onnx": lambda out: pth2onnx.main([str(nano_weights), str(out), "--arch",
                                               "nano-ocr"]),
        "fix": lambda out: fix.main([str(exported["nano-ocr"]), str(out)]),
        "quantize": lambda out: quantize.main([str(fixed_models["nano-ocr"]), str(out),
                                               "--calibration", str(tiny_lmdb),
                                               "--min-agreement", "0"]),
    }
    for name, call in calls.items():
        for victim in (foreign_model, notes):
            before = victim.read_bytes()
            assert call(victim) == 1, name
            _one_line_error(capsys, f"{victim}: exists and was not written by this toolchain")
            assert victim.read_bytes() == before, name
        own = tmp_path / f"{name}.onnx"
        assert call(own) == 0
        earlier = onnx.load(str(own))
        earlier.metadata_props.add(key="crnn.test_marker", value="the earlier run")
        onnx.save(earlier, str(own))
        assert call(own) == 0, name  # its own earlier output: replaced
        keys = {p.key for p in onnx.load(str(own)).metadata_props}
        assert "crnn.arch" in keys and "crnn.test_marker" not in keys, name
    capsys.readouterr()


def test_a_model_writer_never_writes_over_its_input(tmp_path, capsys, fixed_models, nano_weights,
                                                    tiny_lmdb):
    """fix and quantize read a model this toolchain wrote; writing the result over it would
    lose it, so the input path is refused as the output (pth2onnx likewise for its checkpoint)."""
    model = tmp_path / "nano_fixed.onnx"
    model.write_bytes(fixed_models["nano-ocr"].read_bytes())
    weights = tmp_path / "nano.pth"
    weights.write_bytes(nano_weights.read_bytes())
    before = model.read_bytes()
    for call, path in ((lambda: fix.main([str(model), str(model)]), model),
                       (lambda: quantize.main([str(model), str(tmp_path / "." / model.name),
                                               "--calibration", str(tiny_lmdb)]), model),
                       (lambda: pth2onnx.main([str(weights), str(weights), "--arch",
                                               "nano-ocr"]), weights)):
        assert call() == 1
        _one_line_error(capsys, f"{path}: is the input model; the output must be another file")
    assert model.read_bytes() == before and weights.read_bytes() == nano_weights.read_bytes()
