"""common.outputs: an existing file is replaced only when the tool recognises it as its own."""

from __future__ import annotations

import pytest

from common.errors import ToolchainError
from common.outputs import check_output_file
from models.onnx_file import written_by_toolchain


def test_a_file_the_tool_did_not_write_is_refused_and_left_alone(tmp_path):
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("keep me")
    with pytest.raises(ToolchainError) as raised:
        check_output_file(theirs, "--report", tool="a tool")
    assert str(raised.value) == (f"{theirs}: exists and was not written by a tool; nothing was "
                                 "changed; give --report a new path (or move that file away)")
    with pytest.raises(ToolchainError, match="not written by a tool"):
        check_output_file(theirs, "--report", ours=lambda path: False, tool="a tool")
    assert theirs.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [theirs]  # no probe file left behind either


def test_the_tools_own_file_an_empty_file_and_a_new_path_are_accepted(tmp_path):
    own, empty, new = tmp_path / "own.json", tmp_path / "empty.json", tmp_path / "sub" / "n.json"
    own.write_text('{"mine": true}')
    empty.touch()
    seen = []
    assert check_output_file(own, ours=lambda path: seen.append(path) or True) == own
    assert seen == [own]  # the predicate is asked about the file itself
    assert check_output_file(empty) == empty  # nothing to lose
    assert check_output_file(new) == new and new.parent.is_dir() and not new.exists()


def test_written_by_toolchain_needs_our_metadata(tmp_path, fixed_models):
    import onnx

    assert written_by_toolchain(fixed_models["nano-ocr"])
    model = onnx.load(str(fixed_models["nano-ocr"]))
    del model.metadata_props[:]
    model.metadata_props.add(key="producer_note", value="someone else's")
    theirs = tmp_path / "theirs.onnx"
    onnx.save(model, str(theirs))
    assert not written_by_toolchain(theirs)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a model")
    assert not written_by_toolchain(tmp_path / "garbage.onnx")
    assert not written_by_toolchain(tmp_path / "missing.onnx")
