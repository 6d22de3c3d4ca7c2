"""The in-memory text detector: whole images in, text boxes out.

``Detector(runner, spec)`` resizes each image by the detector description's rule
(:meth:`models.det_spec.DetectorSpec.input_size`, OpenCV bilinear), normalises it in the
model's channel order, runs images whose inputs have the same size as one batch (no padding,
so a result equals the batch-1 result) and turns each probability map into boxes with
:func:`models.db_postprocess.boxes_from_map`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import ToolchainError
from infer.base import Runner
from models.db_postprocess import TextBox, boxes_from_map
from models.det_spec import DetectorSpec
from preprocess.image import detector_input


@dataclass
class Detector:
    """Detect text in whole images with a runner and its detector description.

    Args:
        runner: the backend (``infer.open_model`` on a detector file); loaded by :meth:`load`.
        spec: the detector description (tensors, resize rule, DB settings).
        batch_size: images of one input size per engine call, at most.

    Raises:
        ToolchainError: ``batch_size < 1``.
    """

    runner: Runner
    spec: DetectorSpec
    batch_size: int = 4
    #: Seconds spent in the engine, in resizing and in DB post-processing, summed over calls.
    engine_seconds: float = 0.0
    prepare_seconds: float = 0.0
    postprocess_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ToolchainError(f"batch size must be >= 1, got {self.batch_size}")

    def load(self) -> Detector:
        """Load the runner and check that its input is the one the description names."""
        self.runner.load()
        names = [s.name for s in self.runner.input_specs()]
        if self.spec.input_name not in names:
            raise ToolchainError(f"the detector's input is not {self.spec.input_name!r} as its "
                                 f"description says; inputs are: {', '.join(names)}")
        return self

    def close(self) -> None:
        """Release the runner."""
        self.runner.close()

    def __enter__(self) -> Detector:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def probability_maps(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[N, H, W]`` text probabilities for a float32 ``[N, 3, H, W]`` batch.

        Raises:
            EngineError: the engine failed on this batch.
        """
        outputs = self.runner.infer({self.spec.input_name: batch})
        self.engine_seconds += self.runner.last_engine_seconds
        return outputs[self.spec.output_name][:, 0]

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[TextBox]]:
        """The boxes of each image, in input order.

        Args:
            images: uint8 ``[h, w, 3]`` RGB pixels.

        Raises:
            EngineError: the engine failed (every image of the call is lost; callers that
                need per-image failures call with one image, or batch themselves).
        """
        start = time.perf_counter()
        inputs = [detector_input(image, self.spec) for image in images]
        self.prepare_seconds += time.perf_counter() - start
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(inputs):
            groups.setdefault(array.shape, []).append(index)
        results: list[list[TextBox] | None] = [None] * len(images)
        for members in groups.values():
            for first in range(0, len(members), self.batch_size):
                chunk = members[first:first + self.batch_size]
                maps = self.probability_maps(np.stack([inputs[i] for i in chunk]))
                start = time.perf_counter()
                for row, index in enumerate(chunk):
                    height, width = images[index].shape[:2]
                    results[index] = boxes_from_map(maps[row], self.spec, (width, height))
                self.postprocess_seconds += time.perf_counter() - start
        return results
