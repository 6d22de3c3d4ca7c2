"""Read IIIT5K-style lmdb test sets (the CRNN family's layout).

Keys: ``num-samples`` (ASCII integer N), ``image-%09d`` (encoded image bytes) and
``label-%09d`` (UTF-8 word), indices 1..N (clovaai deep-text-recognition-benchmark,
meijieru crnn.pytorch, Ascend ModelZoo). Opened read-only without a lock file, so a
read-only folder works.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lmdb

from convert.errors import ToolchainError

log = logging.getLogger(__name__)

_INDEXED_KEY = re.compile(rb"^(?:image|label)-(\d{9})$")

#: Environment variable naming the IIIT5K test lmdb.
TEST_SET_ENV = "IIIT5K_LMDB"
#: Environment variable naming the calibration lmdb (int8 quantisation; not the test set).
CALIBRATION_SET_ENV = "IIIT5K_CALIB_LMDB"


def _from_env_or_shared(variable: str, folder: str) -> Path:
    """``$variable``, else ``../shared/data/<folder>`` beside the repository."""
    fallback = Path(__file__).resolve().parents[2] / "shared" / "data" / folder
    return Path(os.environ.get(variable, fallback))


def default_test_set() -> Path:
    """``$IIIT5K_LMDB``, else ``../shared/data/IIIT5K_3000`` beside the repository."""
    return _from_env_or_shared(TEST_SET_ENV, "IIIT5K_3000")


def default_calibration_set() -> Path:
    """``$IIIT5K_CALIB_LMDB``, else ``../shared/data/IIIT5K_train_500`` beside the repository."""
    return _from_env_or_shared(CALIBRATION_SET_ENV, "IIIT5K_train_500")


@dataclass(frozen=True)
class RawSample:
    """One index of the lmdb as stored; ``None`` where the key is absent."""

    index: int
    image: bytes | None
    label: bytes | None


def open_lmdb(path: str | Path) -> lmdb.Environment:
    """Open an lmdb folder read-only without locking.

    Raises:
        ToolchainError: the path is missing or not an lmdb environment.
    """
    path = Path(path)
    if not path.is_dir() or not (path / "data.mdb").is_file():
        raise ToolchainError(f"{path}: not an lmdb folder (expected {path / 'data.mdb'})")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=256)
    except lmdb.Error as exc:
        raise ToolchainError(f"{path}: cannot open as lmdb ({exc})") from exc


def count_samples(env: lmdb.Environment, path: str | Path) -> int:
    """N from ``num-samples``; if that key is missing, the largest indexed key found.

    Raises:
        ToolchainError: ``num-samples`` is not an integer, or the lmdb holds no samples.
    """
    with env.begin() as txn:
        raw = txn.get(b"num-samples")
        if raw is not None:
            try:
                return int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise ToolchainError(
                    f"{path}: num-samples is {raw[:20]!r}, not an integer"
                ) from None
        largest = 0
        for key in txn.cursor().iternext(keys=True, values=False):
            match = _INDEXED_KEY.match(key)
            if match:
                largest = max(largest, int(match.group(1)))
    if largest == 0:
        raise ToolchainError(f"{path}: no num-samples key and no image-/label- keys")
    log.warning("%s: num-samples is missing; using the largest index found, %d", path, largest)
    return largest


def read_sample(txn: lmdb.Transaction, index: int) -> RawSample:
    """The raw image and label bytes stored at 1-based ``index``."""
    return RawSample(index, txn.get(b"image-%09d" % index), txn.get(b"label-%09d" % index))
