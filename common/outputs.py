"""Write outputs whole or not at all, and refuse output paths that cannot be written.

Every file a tool writes goes to a temporary name in the target's folder and is renamed into
place only once it is complete (``os.replace`` is atomic within a file system), so an
interrupt or a write error never leaves a cut-short file, nor a new file beside a stale one
of the same run. Paths are checked before any long work starts, and no tool replaces a file
it did not write: an existing file is replaced only when the tool recognises it as its own
earlier output (:func:`check_output_file`'s ``ours``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from common.errors import ToolchainError


def check_output_file(path: str | Path, flag: str = "output", *,
                      ours: Callable[[Path], bool] | None = None,
                      tool: str = "this tool") -> Path:
    """Check that ``path`` can be written as a file, creating its folder if needed, and that
    writing it replaces nothing the tool did not write.

    Args:
        path: the file to write.
        flag: how the tool names this output in its message (e.g. ``--report``).
        ours: tells whether an existing file is the tool's own earlier output, which may be
            replaced; None: no existing file may be. An empty file holds nothing to lose and
            may always be replaced.
        tool: how the message names the tool (``tool`` did not write the file).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ToolchainError: ``path`` is a folder, a non-empty file ``ours`` does not recognise
            (nothing is touched), its folder cannot be created or is not a folder, or it
            cannot be written there (one line naming the path).
    """
    path = Path(path)
    if path.is_dir():
        raise ToolchainError(f"{path}: is a folder; {flag} must name a file")
    if path.is_file() and path.stat().st_size and not (ours is not None and ours(path)):
        raise ToolchainError(f"{path}: exists and was not written by {tool}; nothing was "
                             f"changed; give {flag} a new path (or move that file away)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.check-"):
            pass
    except OSError as exc:
        raise ToolchainError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    return path


def json_content(path: Path) -> object | None:
    """The JSON value in ``path``, or None where it cannot be read as UTF-8 JSON; for the
    ``ours`` checks that tell a tool's own earlier output from any other file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def claim_output_folder(folder: str | Path, tool: str, flag: str = "output folder") -> Path:
    """Make ``folder`` a folder ``tool`` may write files into: a new or empty folder, or one
    that ``tool`` claimed before; a marker file ``.<tool>-output`` records the claim.

    Raises:
        ToolchainError: ``folder`` is a file, or a non-empty folder ``tool`` did not write
            (nothing in it is touched), or it cannot be written (one line naming it).
    """
    folder = Path(folder)
    marker = folder / f".{tool}-output"
    if folder.exists() and not folder.is_dir():
        raise ToolchainError(f"{folder}: is a file; {flag} must name a folder")
    if folder.is_dir() and not marker.is_file() and any(folder.iterdir()):
        raise ToolchainError(f"{folder}: not empty and not written by {tool}; {flag} must "
                             "name a new or empty folder (nothing was touched)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:
        raise ToolchainError(f"{folder}: cannot be written ({exc.strerror or exc})") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed to ``path`` when the block ends cleanly,
    removed when it raises.

    Raises:
        ToolchainError: the temporary file cannot be created or renamed (names ``path``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-",
                                        suffix=path.suffix)
    except OSError as exc:
        raise ToolchainError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; follow the umask
        os.replace(temporary, path)
    except OSError as exc:
        raise ToolchainError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_texts(texts: dict[Path, str]) -> None:
    """Write several text files so that they appear together: all are written aside first,
    then renamed one after another; a failure before the renames leaves none of them.

    Raises:
        ToolchainError: a file cannot be written (names it).
    """
    with contextlib.ExitStack() as stack:
        staged = []
        for path, text in texts.items():
            temporary = stack.enter_context(atomic_path(path))
            try:
                temporary.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise ToolchainError(f"{path}: cannot be written ({exc.strerror or exc})") from None
            staged.append(temporary)


def current_umask() -> int:
    """The process's file-creation mask (``os.umask`` can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
