"""Write a word-crop lmdb of our format, whole or not at all.

The layout is the one :mod:`preprocess.lmdb_reader` reads (the CRNN family's): ``num-samples``
(ASCII integer N), ``image-%09d`` (encoded image bytes) and ``label-%09d`` (UTF-8), indices
1..N, plus an optional marker key (``synthetic`` for rendered data). The folder is written
aside (``.NAME.partial-*`` beside it) and renamed into place when complete, so a reader never
sees half an lmdb, and an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import lmdb

from common.errors import ToolchainError
from common.outputs import current_umask


def write_word_lmdb(output: Path, entries: Iterable[tuple[bytes, str]], map_size: int = 1 << 30,
                    marker: tuple[bytes, bytes] | None = None) -> int:
    """Write ``entries`` (encoded image, label) as indices 1..N of a new lmdb folder.

    Args:
        output: a folder that does not exist yet.
        entries: ``(image bytes, label)`` pairs, consumed once (a generator is fine).
        map_size: the lmdb map size in bytes (an upper bound on the data, not allocated).
        marker: an extra ``(key, value)`` written beside the samples, or None.

    Returns:
        N, the number of samples written.

    Raises:
        ToolchainError: ``output`` exists, or cannot be written (names it).
    """
    output = Path(output)
    if output.exists():
        raise ToolchainError(f"{output} already exists; name a new folder (nothing was touched)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    except OSError as exc:
        raise ToolchainError(f"{output}: cannot be written ({exc.strerror or exc})") from None
    count = 0
    try:
        env = lmdb.open(str(partial), map_size=map_size, subdir=True)
        try:
            with env.begin(write=True) as txn:
                for count, (image, label) in enumerate(entries, 1):
                    txn.put(b"image-%09d" % count, image)
                    txn.put(b"label-%09d" % count, label.encode("utf-8"))
                txn.put(b"num-samples", str(count).encode())
                if marker is not None:
                    txn.put(*marker)
        finally:
            env.close()
        os.chmod(partial, 0o777 & ~current_umask())  # mkdtemp makes 0700; follow the umask
        os.replace(partial, output)  # the folder appears whole
    except (OSError, lmdb.Error) as exc:
        raise ToolchainError(f"{output}: cannot be written ({exc})") from None
    finally:
        if partial.exists():  # ours, half written: an error or Ctrl-C stopped it
            shutil.rmtree(partial)
    return count
