"""ais_bench backend: runs an Ascend .om model on an NPU through ``ais_bench.infer.interface``.

ais_bench is not on PyPI: it comes as two wheels, ``aclruntime`` and ``ais_bench``, from
Ascend's ait/tools repository, and needs CANN and an NPU. PyPI's ``ais-bench-benchmark``
is an unrelated LLM benchmark that installs a package of the same name and shadows it.

The dynamic-shape plan and the model description are read from the sidecar JSON that
``convert.atc`` writes beside the .om (``<om stem>.json``); tensor names, shapes and output
sizes come from them, so any model ``convert.atc`` builds runs here:
    ``range`` models run with ``mode="dymshape"``; ``custom_sizes`` (bytes reserved for the
    output) is the size of the output this batch produces, ``spec.output_shape(batch,
    width)`` float32 values.
    ``gears`` models run with ``mode="dymdims"``: each gear axis is padded on the right up to
    the smallest gear that holds the input (with ``PAD_VALUE``, 0.0), the batch is padded
    up to the compiled batch (a classifier's batch gears: the next gear) and larger batches
    are split; the padded rows and the frames
    past ``frames(width)`` are dropped from the output, so outputs have the shape other
    backends return. Padding the width can change what a backward LSTM reads at the right
    edge; prefer range models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from infer.base import InputSpec, Runner
from models.sidecar import read_sidecar
from preprocess.batching import PAD_VALUE

INSTALL_HINT = (
    "install Ascend's aclruntime and ais_bench wheels (ait/tools repository, matching your "
    "CANN and Python) on the NPU machine; note that PyPI's `ais-bench-benchmark` is an "
    "unrelated tool that shadows the `ais_bench` name"
)


class AisBenchRunner(Runner):
    """Runs an .om with ais_bench's ``InferSession`` on one NPU.

    Args:
        om_path: the .om file from ATC.
        device_id: NPU index.
        sidecar: sidecar JSON path (default: beside the .om).
    """

    name = "ais_bench"
    requires = "ais_bench"
    engine_errors = (RuntimeError,)  # aclruntime reports failed executions as RuntimeError

    @classmethod
    def from_file(cls, path, spec, device, options):
        """See :meth:`infer.base.Runner.from_file`."""
        return cls(path, device.ordinal, options.sidecar)

    def __init__(self, om_path: str | Path, device_id: int = 0, sidecar: str | Path | None = None):
        super().__init__()
        self.om_path, self.device_id = Path(om_path), device_id
        self.sidecar_path = Path(sidecar) if sidecar else None
        self.session = None

    def _load(self) -> None:
        if not self.om_path.is_file():
            raise ToolchainError(f"{self.om_path}: no such .om model")
        self.plan, self.spec = read_sidecar(self.om_path, self.sidecar_path)
        if not self.is_available():
            raise ToolchainError(f"the ais_bench backend needs ais_bench, which is not installed: "
                                 f"{INSTALL_HINT}")
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError as exc:
            raise ToolchainError(f"`ais_bench` is installed but has no infer.interface "
                                 f"({exc}): {INSTALL_HINT}") from exc
        self.session = InferSession(self.device_id, str(self.om_path))

    def input_specs(self) -> list[InputSpec]:
        specs = []
        for plan in self.plan.inputs:
            # Axis 0 is the batch: split (and padded) to what the model takes, so any size runs.
            shape = tuple(None if axis == 0 or not isinstance(d, int) or d == -1 else d
                          for axis, d in enumerate(plan.dims))
            if self.plan.mode == "range":
                ranges = plan.ranges()
            else:  # gears: each gear axis takes anything up to its largest gear (padded up)
                top = self._gear_tops(plan)
                ranges = {axis: (self.spec.min_input_width if axis == 3 else 1, top[axis])
                          for axis in plan.gear_axes() if axis != 0}
            specs.append(InputSpec(plan.name, np.dtype(np.float32), shape, ranges))
        return specs

    def _gear_tops(self, plan) -> dict[int, int]:
        axes = plan.gear_axes()
        return {axis: max(g[k] for g in self.plan.gears) for k, axis in enumerate(axes)}

    def _as_output(self, scores: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
        """The engine output in the description's shape (ais_bench may return it flat)."""
        shape = self.spec.output_shape_of(input_shape)
        if scores.size != int(np.prod(shape)):
            raise ToolchainError(f"{self.om_path}: output of {scores.size} values for input "
                                 f"{tuple(input_shape)}, expected {shape}")
        return scores.reshape(shape)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = feed[self.spec.input_name]
        if self.plan.mode == "range":
            size = int(np.prod(self.spec.output_shape_of(images.shape))) * 4  # float32
            (scores,) = self._timed(self.session.infer, [images], mode="dymshape",
                                    custom_sizes=size)
            return {self.spec.output_name: self._as_output(scores, images.shape)}
        return {self.spec.output_name: self._infer_gears(images)}

    def _infer_gears(self, images: np.ndarray) -> np.ndarray:
        (plan,) = self.plan.inputs
        axes = plan.gear_axes()
        sizes = list(images.shape)
        if 0 in axes:  # batch gears: a larger batch runs in chunks of the largest gear
            sizes[0] = min(sizes[0], self._gear_tops(plan)[0])
        fitting = [g for g in self.plan.gears
                   if all(sizes[axis] <= g[k] for k, axis in enumerate(axes))]
        gear = min(fitting, key=lambda g: int(np.prod(g)))  # input_specs bounds every axis
        compiled = gear[axes.index(0)] if 0 in axes else plan.dims[0]
        padded_shape = list(images.shape)
        padded_shape[0] = compiled
        for k, axis in enumerate(axes):
            padded_shape[axis] = gear[k]
        total, pieces = 0.0, []
        for start in range(0, images.shape[0], compiled):
            chunk = images[start:start + compiled]
            padded = np.full(padded_shape, PAD_VALUE, np.float32)
            padded[tuple(slice(0, n) for n in chunk.shape)] = chunk
            (scores,) = self._timed(self.session.infer, [padded], mode="dymdims")
            total += self.last_engine_seconds
            full = self._as_output(scores, tuple(padded_shape))
            pieces.append(self.spec.trim_output(full, len(chunk), images.shape))
        self.last_engine_seconds = total
        return np.concatenate(pieces, axis=self.spec.batch_axis)

    def _close(self) -> None:
        if self.session is not None:
            self.session.free_resource()
        self.session = None
