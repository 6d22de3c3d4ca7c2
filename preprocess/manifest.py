"""The input folder's ``manifest.json``: its one owner (written by ``parse_testdata``, read by
``eval.inputs``).

Keys: ``version`` (:data:`MANIFEST_VERSION`), ``source`` (the lmdb's path), ``num_samples``,
``output_id`` (matched by the folder's marker), ``entries_beyond_num_samples``, ``synthetic``,
``model`` (the model description), ``policy`` (the preprocessing settings), ``samples`` (one
dict per reading: ``index``, ``label``, ``file``, ``row``, ``width``, and ``turn`` for a
turned reading) and ``failed`` (one record per failed sample or range, with its reason).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import ToolchainError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write ``manifest`` as ``folder/manifest.json`` (UTF-8, readable indentation); return
    the path. The caller writes into a staging folder it renames whole."""
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an input folder, or None when it has none.

    Raises:
        ToolchainError: the file is unreadable or not a JSON object.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: not a parse_testdata manifest ({exc!r})") from None
    if not isinstance(manifest, dict):
        raise ToolchainError(f"{path}: not a parse_testdata manifest (not a JSON object)")
    return manifest
