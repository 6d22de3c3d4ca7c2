"""Read the model inputs written by ``preprocess.parse_testdata`` (or by ModelZoo's script).

With a ``manifest.json`` (our layout) everything comes from it: samples, labels, resized
widths, the model description and the preprocessing failures. A ModelZoo folder
(``test_{i}.npy`` files, no manifest) needs its ``label.txt`` (``test_{i}.npy:label``); the
widths are read from the arrays. ``--label`` overrides labels in either case.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from models.spec import TURNS
from preprocess.manifest import MANIFEST, read_manifest

_LABEL_LINE = re.compile(r"^test_(\d+)\.npy:(.*)$")


@dataclass
class Sample:
    """One input: lmdb index, label (case kept), input file and row, resized width, and the
    quarter turn of the reading (``models.spec.TURNS``; a crop the model reads turned has
    one input per turn, under one index)."""

    index: int
    label: str
    file: str
    row: int
    width: int
    turn: int = 0


@dataclass
class InputSet:
    """What an input folder holds.

    Attributes:
        folder: the folder.
        samples: samples with inputs, in index order.
        failed: ``{"index", "reason", "stage"}`` records of samples that have no input.
        model: the model description used by preprocessing (None for ModelZoo folders).
        policy: the preprocessing policy (None for ModelZoo folders).
        num_samples: size of the source set (inputs + failures).
        source: the lmdb the inputs come from (None for ModelZoo folders).
        synthetic: the lmdb was generated (``preprocess.make_synthetic_lmdb``).
    """

    folder: Path
    samples: list[Sample]
    failed: list[dict] = field(default_factory=list)
    model: dict | None = None
    policy: dict | None = None
    num_samples: int = 0
    source: str | None = None
    synthetic: bool = False

    def files(self) -> list[tuple[str, list[Sample]]]:
        """Input files in name order, each with its samples in row order."""
        by_file: dict[str, list[Sample]] = {}
        for sample in self.samples:
            by_file.setdefault(sample.file, []).append(sample)
        return [(name, sorted(by_file[name], key=lambda s: s.row)) for name in sorted(by_file)]

    def batches(self, prefetch: int = 2) -> Iterator[tuple[np.ndarray, list[Sample], float]]:
        """``(float32 [B, 1, H, W], samples, seconds spent reading)`` per file.

        Files are read ``prefetch`` ahead on a background thread so that reading overlaps
        inference.
        """
        def load(name: str) -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            array = np.load(self.folder / name)
            return array, time.perf_counter() - start

        files = self.files()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npy-reader") as pool:
            pending = [pool.submit(load, name) for name, _ in files[:prefetch]]
            for position, (_name, samples) in enumerate(files):
                array, seconds = pending.pop(0).result()
                if position + prefetch < len(files):
                    pending.append(pool.submit(load, files[position + prefetch][0]))
                rows = [s.row for s in samples]
                if rows != list(range(array.shape[0])):
                    array = array[rows]
                yield array, samples, seconds


def read_label_file(path: Path) -> dict[int, str]:
    """Parse a ModelZoo ``label.txt`` (``test_{index}.npy:label`` per line) into ``{index: label}``.

    Raises:
        ToolchainError: missing file or a line of another form (its number is named).
    """
    if not path.is_file():
        raise ToolchainError(f"{path}: no such label file")
    labels = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _LABEL_LINE.match(line)
        if match is None:
            raise ToolchainError(
                f"{path}:{number}: expected 'test_<index>.npy:<label>', got {line!r}"
            )
        labels[int(match.group(1))] = match.group(2)
    return labels


def load_input_set(folder: str | Path, label_file: str | Path | None = None) -> InputSet:
    """Read an input folder (see the module docstring).

    Raises:
        ToolchainError: the folder is missing, has neither a manifest nor (with
            ``label_file``) test_*.npy files, or labels are missing for some samples.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolchainError(f"{folder}: no such input folder")
    labels = read_label_file(Path(label_file)) if label_file else None
    manifest_path = folder / MANIFEST
    manifest = read_manifest(folder)
    if manifest is not None:
        try:
            samples = [
                Sample(s["index"], s["label"], s["file"], s["row"], s["width"], s.get("turn", 0))
                for s in manifest["samples"]
            ]
        except (KeyError, TypeError) as exc:
            raise ToolchainError(
                f"{manifest_path}: not a parse_testdata manifest ({exc!r})"
            ) from exc
        odd = next((s for s in samples if s.turn not in TURNS), None)
        if odd is not None:
            raise ToolchainError(f"{manifest_path}: sample {odd.index} has turn {odd.turn!r}; "
                                 f"a reading's turn is one of {list(TURNS)}")
        failed = [{**f, "stage": "preprocess"} for f in manifest.get("failed", [])]
        result = InputSet(
            folder,
            samples,
            failed,
            manifest.get("model"),
            manifest.get("policy"),
            manifest.get("num_samples", len(samples) + len(failed)),
            manifest.get("source"),
            bool(manifest.get("synthetic", False)),
        )
    else:
        if labels is None:
            raise ToolchainError(
                f"{folder}: no manifest.json; pass --label label.txt for a "
                "ModelZoo-style folder of test_<index>.npy files"
            )
        samples = []
        for path in sorted(folder.glob("test_*.npy")):
            index = int(path.stem.split("_", 1)[1])
            array = np.load(path, mmap_mode="r")
            if array.ndim != 4 or array.shape[0] != 1:
                raise ToolchainError(f"{path}: expected shape [1, C, H, W], got {array.shape}")
            samples.append(Sample(index, "", path.name, 0, int(array.shape[3])))
        if not samples:
            raise ToolchainError(f"{folder}: no manifest.json and no test_*.npy files")
        samples.sort(key=lambda s: s.index)
        result = InputSet(folder, samples, [], None, None, len(samples))
    if labels is not None:
        missing = [s.index for s in result.samples if s.index not in labels]
        if missing:
            raise ToolchainError(
                f"{label_file}: no label for {len(missing)} samples, e.g. test_{missing[0]}.npy"
            )
        for sample in result.samples:
            sample.label = labels[sample.index]
    return result
