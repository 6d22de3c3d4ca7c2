"""The manifest's owner: what parse_testdata writes is what eval.inputs reads, and a damaged
manifest is a one-line error naming the file."""

from __future__ import annotations

import pytest

from common.errors import ToolchainError
from eval.inputs import load_input_set
from preprocess.manifest import MANIFEST, read_manifest, write_manifest


def test_a_written_manifest_reads_back(tmp_path):
    content = {"version": 1, "samples": [{"index": 1, "label": "ä", "file": "batch_00000.npy",
                                          "row": 0, "width": 100}], "failed": []}
    assert write_manifest(tmp_path, content) == tmp_path / MANIFEST
    assert read_manifest(tmp_path) == content
    assert read_manifest(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("text, reason", [("{not json", "JSONDecodeError"),
                                          ("[1, 2]", "not a JSON object"),
                                          ('{"samples": [{"index": 1}]}', "KeyError")])
def test_a_damaged_manifest_is_one_line_naming_the_file(tmp_path, text, reason):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ToolchainError, match=reason) as caught:
        load_input_set(tmp_path)
    assert str(tmp_path / MANIFEST) in str(caught.value) and "\n" not in str(caught.value)
