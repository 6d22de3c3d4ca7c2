"""The in-memory image classifier: images in, labels with probabilities out.

``Classifier(runner, spec)`` resizes each image by its description's rule
(:meth:`models.cls_spec.ClassifierSpec.resized_width`, OpenCV bilinear), normalises it in the
model's channel order, pads it on the right with zeros to the input width (``"pad"``), runs
the images in batches of one input size, and turns logits into probabilities with a softmax
where the graph has none. PaddleOCR's text-direction classifier is one such model: the
full-image pipeline turns a crop 180 degrees when it reads "180" with enough confidence
(:func:`upside_down`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from common.errors import ToolchainError
from infer.base import Runner
from models.cls_spec import ClassifierSpec
from preprocess.image import normalise

#: The label of PaddleOCR's direction classifier for text upside down.
UPSIDE_DOWN = "180"


def classifier_input(rgb: np.ndarray, spec: ClassifierSpec) -> np.ndarray:
    """The float32 ``[C, height, width]`` engine input for uint8 ``[h, w, 3]`` RGB pixels.

    Raises:
        ToolchainError: an image without area.
    """
    width = spec.resized_width(rgb.shape[1], rgb.shape[0])
    resized = cv2.resize(rgb, (width, spec.height), interpolation=cv2.INTER_LINEAR)
    if spec.channel_order == "bgr":
        resized = resized[..., ::-1]
    elif spec.channel_order == "grey":
        resized = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)[..., None]
    pixels = normalise(resized, spec)
    if width == spec.width:
        return np.ascontiguousarray(pixels)
    padded = np.zeros(spec.input_shape(1)[1:], np.float32)
    padded[:, :, :width] = pixels
    return padded


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float ``[N, C]`` scores, computed stably (max subtracted)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Classification:
    """One image's classification.

    Attributes:
        probabilities: float32 ``[classes]``, in the description's label order.
        labels: the description's labels.
    """

    probabilities: np.ndarray
    labels: tuple[str, ...]

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.labels[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        """The most probable label's probability."""
        return float(np.max(self.probabilities))

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable ``(label, probability)`` pairs, best first (ties keep the
        label order)."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.labels[i], float(self.probabilities[i])) for i in order]


def classifications(scores: np.ndarray, spec: ClassifierSpec) -> list[Classification]:
    """The :class:`Classification` of each row of an engine output ``[N, classes]``
    (a softmax applied when the description says the output holds logits).

    Raises:
        ToolchainError: the output's class axis is not the description's label count.
    """
    if scores.ndim != 2 or scores.shape[1] != spec.num_classes:
        raise ToolchainError(f"the classifier's output has shape {scores.shape}, not "
                             f"[N, {spec.num_classes}] for its {spec.num_classes} labels")
    scores = scores.astype(np.float32)
    if spec.output_kind == "logits":
        scores = softmax(scores)
    return [Classification(row, spec.labels) for row in scores]


def upside_down(result: Classification, threshold: float) -> bool:
    """Whether a direction classification says to turn the crop 180 degrees: its best label
    is "180" with a probability above ``threshold`` (PaddleOCR ``TextClassifier``,
    ``cls_thresh`` 0.9)."""
    return result.label == UPSIDE_DOWN and result.confidence > threshold


@dataclass
class Classifier:
    """Classify whole images with a runner and its classifier description.

    Args:
        runner: the backend (``infer.open_model`` on a classifier file); loaded by :meth:`load`.
        spec: the classifier description.
        batch_size: images per engine call, at most.

    Raises:
        ToolchainError: ``batch_size < 1``.
    """

    runner: Runner
    spec: ClassifierSpec
    batch_size: int = 16
    #: Seconds spent in the engine, summed over calls.
    engine_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ToolchainError(f"batch size must be >= 1, got {self.batch_size}")

    def load(self) -> Classifier:
        """Load the runner and check that its input is the one the description names."""
        self.runner.load()
        names = [s.name for s in self.runner.input_specs()]
        if self.spec.input_name not in names:
            raise ToolchainError(f"the classifier's input is not {self.spec.input_name!r} as "
                                 f"its description says; inputs are: {', '.join(names)}")
        return self

    def close(self) -> None:
        """Release the runner."""
        self.runner.close()

    def __enter__(self) -> Classifier:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self, batch: np.ndarray) -> list[Classification]:
        """The classifications of a float32 ``[N, C, height, width]`` batch of inputs.

        Raises:
            EngineError: the engine failed on this batch.
        """
        outputs = self.runner.infer({self.spec.input_name: batch})
        self.engine_seconds += self.runner.last_engine_seconds
        return classifications(outputs[self.spec.output_name], self.spec)

    def __call__(self, images: Sequence[np.ndarray]) -> list[Classification]:
        """The classification of each image (uint8 ``[h, w, 3]`` RGB), in input order.

        Raises:
            EngineError: the engine failed (every image of the call is lost).
        """
        inputs = [classifier_input(image, self.spec) for image in images]
        results: list[Classification] = []
        for first in range(0, len(inputs), self.batch_size):
            results.extend(self.run(np.stack(inputs[first:first + self.batch_size])))
        return results
