"""ais_bench backend: runs an Ascend .om model on an NPU through ``ais_bench.infer.interface``.

ais_bench is not on PyPI: it comes as two wheels, ``aclruntime`` and ``ais_bench``, from
Ascend's ait/tools repository, and needs CANN and an NPU. PyPI's ``ais-bench-benchmark``
is an unrelated LLM benchmark that installs a package of the same name and shadows it.

The dynamic-shape plan is read from the sidecar JSON that ``convert.atc`` writes beside the
.om (``<om stem>.json``):
    ``range`` models run with ``mode="dymshape"``; ``custom_sizes`` (bytes reserved for the
    output) is the size of the largest output this batch can produce:
    ``frames(width) * batch * classes * 4``.
    ``gears`` models run with ``mode="dymdims"``: the width is padded on the right up to
    the next compiled gear and the batch up to the compiled batch (with ``PAD_VALUE``, 0.0),
    larger batches are split, and the padded rows and the frames past ``frames(width)`` are
    dropped from the output, so outputs have the shape other backends return. Padding the
    width can change what the backward LSTM reads at the right edge; prefer range models.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np

from convert.errors import ToolchainError
from convert.spec import ModelSpec
from infer.base import InputSpec, Runner
from preprocess.batching import PAD_VALUE

INSTALL_HINT = (
    "install Ascend's aclruntime and ais_bench wheels (ait/tools repository, matching your "
    "CANN and Python) on the NPU machine; note that PyPI's `ais-bench-benchmark` is an "
    "unrelated tool that shadows the `ais_bench` name"
)
OUTPUT_NAME = "output1"


def read_sidecar(om_path: Path, sidecar: Path | None = None) -> dict:
    """The sidecar JSON of an .om (default ``<om stem>.json``).

    Raises:
        ToolchainError: missing or unreadable sidecar, or one without a model description.
    """
    path = sidecar or om_path.with_suffix(".json")
    if not path.is_file():
        raise ToolchainError(f"{path}: no sidecar JSON beside {om_path.name}; build the model with "
                             "`python -m convert.atc` (it writes one) or pass its path")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: unreadable sidecar ({exc})") from exc
    if data.get("mode") not in ("range", "gears") or not data.get("model"):
        raise ToolchainError(f"{path}: sidecar lacks 'mode' (range|gears) or 'model'")
    return data


class AisBenchRunner(Runner):
    """Runs an .om with ais_bench's ``InferSession`` on one NPU.

    Args:
        om_path: the .om file from ATC.
        device_id: NPU index.
        sidecar: sidecar JSON path (default: beside the .om).
    """

    name = "ais_bench"
    requires = "ais_bench"

    def __init__(self, om_path: str | Path, device_id: int = 0, sidecar: str | Path | None = None):
        super().__init__()
        self.om_path, self.device_id = Path(om_path), device_id
        self.sidecar_path = Path(sidecar) if sidecar else None
        self.session = None

    def _load(self) -> None:
        if not self.om_path.is_file():
            raise ToolchainError(f"{self.om_path}: no such .om model")
        self.plan = read_sidecar(self.om_path, self.sidecar_path)
        self.spec = ModelSpec.from_dict(self.plan["model"], f"sidecar of {self.om_path}")
        if not self.is_available():
            raise ToolchainError(f"the ais_bench backend needs ais_bench, which is not installed: "
                                 f"{INSTALL_HINT}")
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError as exc:
            raise ToolchainError(f"`ais_bench` is installed but has no infer.interface "
                                 f"({exc}): {INSTALL_HINT}") from exc
        self.session = InferSession(self.device_id, str(self.om_path))

    @property
    def input_name(self) -> str:
        return self.plan.get("input_name", "imgs")

    def input_specs(self) -> list[InputSpec]:
        spec = self.spec
        if self.plan["mode"] == "range":
            ranges = {0: tuple(self.plan["batch"]), 3: tuple(self.plan["width"])}
        else:  # gears: any batch (split/padded), widths up to the largest gear
            ranges = {3: (spec.MIN_INPUT_WIDTH, max(self.plan["gears"]))}
        return [InputSpec(self.input_name, np.dtype(np.float32),
                          (None, spec.channels, spec.height, None), ranges)]

    def output_bytes(self, batch: int, width: int) -> int:
        """Bytes of the largest output a ``[batch, 1, 32, width]`` input can produce."""
        return self.spec.frames(width) * batch * self.spec.num_classes * 4

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        imgs = feed[self.input_name]
        if self.plan["mode"] == "range":
            size = self.output_bytes(imgs.shape[0], imgs.shape[3])
            (logits,) = self._timed(self.session.infer, [imgs], mode="dymshape",
                                    custom_sizes=size)
            return {OUTPUT_NAME: self._as_tnc(logits, imgs.shape[0], imgs.shape[3])}
        return {OUTPUT_NAME: self._infer_gears(imgs)}

    def _as_tnc(self, logits: np.ndarray, batch: int, width: int) -> np.ndarray:
        """The engine output as ``[T, batch, C]`` (ais_bench may return it flat)."""
        shape = (self.spec.frames(width), batch, self.spec.num_classes)
        if logits.size != int(np.prod(shape)):
            raise ToolchainError(f"{self.om_path}: output of {logits.size} values for input "
                                 f"[{batch}, 1, 32, {width}], expected {shape}")
        return logits.reshape(shape)

    def _infer_gears(self, imgs: np.ndarray) -> np.ndarray:
        gears, compiled = sorted(self.plan["gears"]), self.plan["batch"][0]
        width = imgs.shape[3]
        gear = gears[bisect.bisect_left(gears, width)]
        total, pieces = 0.0, []
        for start in range(0, imgs.shape[0], compiled):
            chunk = imgs[start:start + compiled]
            padded = np.full((compiled, *imgs.shape[1:3], gear), PAD_VALUE, np.float32)
            padded[: len(chunk), :, :, :width] = chunk
            (logits,) = self._timed(self.session.infer, [padded], mode="dymdims")
            total += self.last_engine_seconds
            full = self._as_tnc(logits, compiled, gear)
            pieces.append(full[: self.spec.frames(width), : len(chunk)])
        self.last_engine_seconds = total
        return np.concatenate(pieces, axis=1)

    def _close(self) -> None:
        if self.session is not None:
            self.session.free_resource()
        self.session = None
