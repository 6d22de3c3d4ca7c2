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

from common.errors import ToolchainError

log = logging.getLogger(__name__)

_INDEXED_KEY = re.compile(rb"^(?:image|label)-(\d{9})$")

#: Key that marks a generated (synthetic) lmdb; its figures say nothing about real text.
SYNTHETIC_KEY = b"synthetic"
#: Environment variable naming the IIIT5K test lmdb.
TEST_SET_ENV = "IIIT5K_LMDB"
#: Environment variable naming the calibration lmdb (int8 quantisation; not the test set).
CALIBRATION_SET_ENV = "IIIT5K_CALIB_LMDB"
#: Environment variable naming a training lmdb of real word crops (ICDAR 2015's).
TRAINING_SET_ENV = "IC15_TRAIN_LMDB"


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


def default_training_set() -> Path:
    """``$IC15_TRAIN_LMDB``, else ``../shared/data/IC15_train_words`` beside the repository."""
    return _from_env_or_shared(TRAINING_SET_ENV, "IC15_train_words")


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
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=256)
    except lmdb.Error as exc:
        raise ToolchainError(f"{path}: cannot open as lmdb ({exc})") from exc
    # A truncated data.mdb opens (its meta pages come first) but reading a page past the end
    # of the file is a bus error: check lmdb's own page count against the file first.
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (path / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise ToolchainError(f"{path / 'data.mdb'}: truncated: {size} bytes, but lmdb's page "
                             f"count needs {needed}; copy the file again")
    return env


@dataclass(frozen=True)
class Survey:
    """What the keys of an lmdb test set say, read without reading a value but ``num-samples``.

    Attributes:
        num_samples: N from ``num-samples`` (the largest index present if the key is missing).
        largest: the largest index with an ``image-``/``label-`` key (0: none).
        beyond: indices above ``num_samples`` that have keys (they are not read).
        synthetic: the lmdb carries :data:`SYNTHETIC_KEY` (``preprocess.make_synthetic_lmdb``).
    """

    num_samples: int
    largest: int
    beyond: int
    synthetic: bool = False

    @property
    def readable(self) -> int:
        """Indices worth reading: ``1..min(num_samples, largest)``; above, no key exists."""
        return min(self.num_samples, self.largest)


def survey(env: lmdb.Environment, path: str | Path) -> Survey:
    """Read ``num-samples`` and scan the keys (in time linear in the entries lmdb holds).

    Raises:
        ToolchainError: ``num-samples`` is not a positive integer, the lmdb holds no
            samples, or its key tree is damaged.
    """
    indices: set[int] = set()
    try:
        with env.begin() as txn:
            raw = txn.get(b"num-samples")
            synthetic = txn.get(SYNTHETIC_KEY) is not None
            for key in txn.cursor().iternext(keys=True, values=False):
                match = _INDEXED_KEY.match(key)
                if match:
                    indices.add(int(match.group(1)))
    except lmdb.Error as exc:  # a damaged page in the key tree: nothing can be listed
        raise ToolchainError(f"{path}: damaged lmdb, its keys cannot be read ({exc}); "
                             "copy it again") from exc
    largest = max(indices, default=0)
    if raw is None:
        if largest == 0:
            raise ToolchainError(f"{path}: no num-samples key and no image-/label- keys")
        log.warning("%s: num-samples is missing; using the largest index found, %d", path, largest)
        return Survey(largest, largest, 0, synthetic)
    try:
        count = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ToolchainError(f"{path}: num-samples is {raw[:20]!r}, not an integer") from None
    if count < 1:
        raise ToolchainError(f"{path}: num-samples is {count}; it must be at least 1")
    result = Survey(count, largest, sum(1 for i in indices if i > count), synthetic)
    if result.beyond:
        log.warning("%s: %d indices above num-samples %d have keys and are NOT read",
                    path, result.beyond, count)
    if count > largest:
        log.warning("%s: num-samples is %d but the largest index present is %d: indices %d..%d "
                    "have no keys and are counted as failed", path, count, largest,
                    largest + 1, count)
    return result


def count_samples(env: lmdb.Environment, path: str | Path) -> int:
    """N from ``num-samples`` (see :func:`survey`)."""
    return survey(env, path).num_samples


def read_sample(txn: lmdb.Transaction, index: int) -> RawSample:
    """The raw image and label bytes stored at 1-based ``index``."""
    return RawSample(index, txn.get(b"image-%09d" % index), txn.get(b"label-%09d" % index))
