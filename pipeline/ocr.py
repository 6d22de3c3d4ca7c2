"""Full-image OCR: a text detector, then the recogniser on each detected region.

The flow (Paddle Serving's OCR pipeline, as one in-process DAG):
    1. :class:`pipeline.detector.Detector` finds text boxes (DB post-processing).
    2. Each box is cut out with a perspective warp to an upright rectangle (OpenCV
       ``getPerspectiveTransform`` + ``warpPerspective``, replicated borders, as PaddleOCR's
       ``get_rotate_crop_image``); a crop at least ``tall_ratio`` times as high as wide is
       turned 90 degrees counter-clockwise (vertical text read top to bottom).
    3. With a text-direction classifier (:class:`pipeline.classifier.Classifier`, PaddleOCR's
       ``use_angle_cls``), a crop it reads as "180" with a probability above
       ``cls_threshold`` (0.9, PaddleOCR's ``cls_thresh``) is read both as it is and turned
       180 degrees, and the more confident reading is kept (:func:`settle_directions`;
       ``cls_verify=False`` reads it turned only, as PaddleOCR does). It runs after the
       tall-crop turn, so a tall crop turned counter-clockwise that is in fact written bottom
       to top ends up turned clockwise (PaddleOCR's order too).
       The crops go through the in-memory recogniser (:class:`pipeline.recognizer.Recognizer`),
       which batches equal input widths.
    4. Word boxes from the CTC alignment (:func:`split_words`): PP-OCR boxes often cover a
       whole line, while ICDAR 2015 scores words. A line is cut at its recognised spaces:
       each character's CTC frame gives an x in the recogniser's resized input
       (``spec.frame_centre_x``), which scales to the crop and maps back to the image
       through the inverse of the crop's perspective transform.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from common.errors import ToolchainError
from models.db_postprocess import TextBox
from models.spec import ModelSpec
from pipeline.classifier import Classifier, upside_down
from pipeline.detector import Detector
from pipeline.recognizer import Failure, Recognition, Recognizer

log = logging.getLogger(__name__)

#: Probability above which the direction classifier's "180" turns a crop (PaddleOCR's
#: ``cls_thresh``).
CLS_THRESHOLD = 0.9


@dataclass(frozen=True)
class OcrWord:
    """One recognised region.

    Attributes:
        points: float32 ``[4, 2]`` corners in pixels of the original image, clockwise from
            the top-left of the text.
        text: the recognised string.
        confidence: the recogniser's confidence (``models.ctc.Decoded``), in ``[0, 1]``.
        box_score: the detector's score of the region it came from.
    """

    points: np.ndarray
    text: str
    confidence: float
    box_score: float

    def as_json(self) -> dict[str, object]:
        """``{"points": [[x, y] x 4], "text", "confidence"}`` (pixels, rounded to 0.1)."""
        return {"points": [[round(float(x), 1), round(float(y), 1)] for x, y in self.points],
                "text": self.text, "confidence": round(float(self.confidence), 4)}


@dataclass(frozen=True)
class OcrLine:
    """One recognised region before it is cut into words.

    Attributes:
        points: float32 ``[4, 2]`` corners of the detector's box in pixels of the original
            image, clockwise from the top-left of the text.
        text: the recognised string.
        confidence: the recogniser's confidence, in ``[0, 1]``.
        words: the indices of its words in :attr:`ImageResult.words`.
        upside_down: whether the direction classifier had the region turned 180 degrees.
    """

    points: np.ndarray
    text: str
    confidence: float
    words: tuple[int, ...]
    upside_down: bool = False

    def as_json(self, words: Sequence[OcrWord]) -> dict[str, object]:
        """``{"points", "text", "confidence", "words": [word JSON]}`` (``OcrWord.as_json``)."""
        return {"points": [[round(float(x), 1), round(float(y), 1)] for x, y in self.points],
                "text": self.text, "confidence": round(float(self.confidence), 4),
                "words": [words[i].as_json() for i in self.words]}


@dataclass
class ImageResult:
    """What the pipeline found in one image.

    Attributes:
        words: the recognised regions, in reading order of the detector's boxes.
        lines: the regions before the cut into words, each naming its words.
        dropped: regions detected but not returned, by reason (``"no text"``: the recogniser
            read nothing; ``"low confidence"``: under ``min_confidence``; ``"recognition"``:
            the crop could not be recognised, with the failure).
    """

    words: list[OcrWord] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    lines: list[OcrLine] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def crop_box(image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The region ``points`` of ``image`` warped to an upright rectangle.

    Args:
        image: uint8 ``[h, w, 3]``.
        points: ``[4, 2]`` corners, clockwise from the top-left.

    Returns:
        The crop, uint8 ``[ch, cw, 3]`` (``cw`` the longer of the top and bottom edges,
        ``ch`` of the left and right edges, each at least 1), and the 3x3 transform from
        image to crop coordinates.
    """
    points = np.asarray(points, np.float32)
    width = max(1, int(round(max(np.linalg.norm(points[0] - points[1]),
                                 np.linalg.norm(points[2] - points[3])))))
    height = max(1, int(round(max(np.linalg.norm(points[0] - points[3]),
                                  np.linalg.norm(points[1] - points[2])))))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(points, target)
    crop = cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)
    return crop, matrix


def word_spans(recognition: Recognition, frame_x) -> list[tuple[str, float, float]]:
    """The words of a recognised line and their x spans in the recogniser's input.

    Args:
        recognition: a greedy-decoded :class:`Recognition` (``char_frames`` set).
        frame_x: ``frame -> x`` of the frame's centre in the resized input, in pixels.

    Returns:
        ``[(word, x0, x1)]`` for every run of non-space characters. The outer ends of the
        first and last word are the input's edges (the detector bounded the line); between
        two words the cut lies in the gap, half a character pitch (the line's mean distance
        between neighbouring characters' frame centres) from each word's outer character,
        and never past the gap's midpoint.
    """
    text, frames = recognition.text, recognition.char_frames
    if len(frames) != len(text) or not text.strip():
        return [(text.strip(), 0.0, float(recognition.width))]
    centres = [frame_x(f) for f in frames]
    pitch = (centres[-1] - centres[0]) / (len(centres) - 1) if len(centres) > 1 else 0.0
    runs, start = [], None
    for index, char in enumerate(text + " "):
        if char != " " and start is None:
            start = index
        elif char == " " and start is not None:
            runs.append((start, index - 1))
            start = None
    spans = []
    for k, (first, last) in enumerate(runs):
        if k == 0:
            x0 = 0.0
        else:
            middle = (centres[runs[k - 1][1]] + centres[first]) / 2
            x0 = max(middle, centres[first] - pitch / 2)
        if k == len(runs) - 1:
            x1 = float(recognition.width)
        else:
            middle = (centres[last] + centres[runs[k + 1][0]]) / 2
            x1 = min(middle, centres[last] + pitch / 2)
        spans.append((text[first:last + 1], x0, x1))
    return spans


def split_words(recognition: Recognition, matrix: np.ndarray,
                spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    """The words of a line crop and their corners in image pixels.

    Args:
        recognition: the crop's recognition (its ``size`` is the crop's ``(cw, ch)``).
        matrix: the image -> crop transform of :func:`crop_box`.
        spec: the recogniser's description (its frames rule places each character:
            ``spec.frame_centre_x``).

    Returns:
        ``[(word, float32 [4, 2] corners clockwise from the top-left)]``.
    """
    crop_width, crop_height = recognition.size
    scale = crop_width / recognition.width
    inverse = np.linalg.inv(matrix)
    words = []
    def frame_x(frame: int) -> float:
        return spec.frame_centre_x(frame, recognition.width)

    for word, x0, x1 in word_spans(recognition, frame_x):
        a, b = x0 * scale, x1 * scale
        corners = np.array([[[a, 0], [b, 0], [b, crop_height], [a, crop_height]]], np.float32)
        words.append((word, cv2.perspectiveTransform(corners, inverse)[0]))
    return words


@dataclass(frozen=True)
class Crop:
    """One detected box cut out of its image.

    Attributes:
        pixels: uint8 ``[ch, cw, 3]`` upright crop (turned 90 degrees when ``rotated``, 180
            more when ``flipped``).
        matrix: 3x3 image -> crop transform (before the 90-degree turn).
        rotated: whether the crop was turned (tall text).
        box: the detector's box (corners from the text's top-left).
        flipped: whether the direction classifier had it turned 180 degrees.
    """

    pixels: np.ndarray
    matrix: np.ndarray
    rotated: bool
    box: TextBox
    flipped: bool = False

    def turned_upside_down(self) -> Crop:
        """This crop turned 180 degrees: its pixels, and its transform and box corners so
        that word boxes still map back onto the image (before a tall crop's turn: a turned
        crop's transform is not used for words)."""
        height, width = self.pixels.shape[:2]
        half_turn = np.array([[-1, 0, width], [0, -1, height], [0, 0, 1]], np.float64)
        matrix = self.matrix if self.rotated else half_turn @ self.matrix
        box = TextBox(np.roll(self.box.points, 2, axis=0), self.box.score)
        return Crop(np.ascontiguousarray(self.pixels[::-1, ::-1]), matrix, self.rotated, box,
                    not self.flipped)


def cut_crops(image: np.ndarray, boxes: Sequence[TextBox], tall_ratio: float) -> list[Crop]:
    """The :class:`Crop` of each box (:func:`crop_box`); crops at least ``tall_ratio`` times
    as high as wide are turned 90 degrees counter-clockwise. ``tall_ratio`` is the
    recogniser description's (``ModelSpec.tall_ratio``), the one tall-crop setting."""
    crops = []
    for box in boxes:
        pixels, matrix = crop_box(image, box.points)
        rotated = pixels.shape[0] >= tall_ratio * pixels.shape[1]
        if rotated:
            pixels = np.ascontiguousarray(np.rot90(pixels))
        crops.append(Crop(pixels, matrix, rotated, box))
    return crops


def assemble(crops: Sequence[Crop], outcomes: Sequence[Recognition | Failure], spec: ModelSpec,
             split: bool = True, min_confidence: float = 0.5) -> ImageResult:
    """One image's result from its crops and their recognitions (in the same order).

    A line read with spaces is cut into words (:func:`split_words`, not for turned crops);
    empty, low-confidence and failed recognitions are dropped and counted by reason.

    Args:
        crops, outcomes: the image's crops and what the recogniser made of each.
        spec: the recogniser's ``ModelSpec`` (its frames rule places the characters).
        split: cut lines at recognised spaces.
        min_confidence: recognitions under this confidence are dropped.
    """
    result = ImageResult()
    for crop, outcome in zip(crops, outcomes):
        if isinstance(outcome, Failure):
            result.drop(f"recognition: {outcome.reason}")
            continue
        text = outcome.text.strip()
        if not text:
            result.drop("no text")
            continue
        if outcome.confidence < min_confidence:
            result.drop("low confidence")
            continue
        if split and not crop.rotated and " " in text:
            pieces = split_words(outcome, crop.matrix, spec)
        else:
            pieces = [(text, crop.box.points)]
        first = len(result.words)
        for word, corners in pieces:
            result.words.append(OcrWord(np.asarray(corners, np.float32), word,
                                        outcome.confidence, crop.box.score))
        result.lines.append(OcrLine(np.asarray(crop.box.points, np.float32), text,
                                    outcome.confidence, tuple(range(first, len(result.words))),
                                    crop.flipped))
    return result


def direction_readings(crops: Sequence[Crop], upside_down: set[int], verify: bool
                       ) -> list[Crop]:
    """What the recogniser reads for ``crops`` of which the direction classifier reads
    ``upside_down`` (indices) as turned: each crop as it is, or turned 180 degrees in its
    place when ``verify`` is False; with ``verify``, the turned crops follow all the crops
    as they are, in index order (:func:`settle_directions` picks)."""
    if not verify:
        return [c.turned_upside_down() if i in upside_down else c for i, c in enumerate(crops)]
    return [*crops, *(crops[i].turned_upside_down() for i in sorted(upside_down))]


def settle_directions(crops: Sequence[Crop], upside_down: set[int], readings: Sequence[Crop],
                      outcomes: Sequence[Recognition | Failure]
                      ) -> list[tuple[Crop, Recognition | Failure]]:
    """Each crop and its recognition, from the readings of :func:`direction_readings`
    (with ``verify``: more readings than crops).

    A crop read both ways keeps the turned reading only when it is more confident than the
    upright one (or the upright one failed): the classifier alone mistakes short upright
    words for upside-down ones (measured on ICDAR 2015: docs/results/README.md), and the
    recogniser's confidence on upside-down text is low.
    """
    chosen = list(zip(readings[:len(crops)], outcomes[:len(crops)]))
    extra = zip(sorted(upside_down), readings[len(crops):], outcomes[len(crops):])
    for index, crop, outcome in extra:
        kept = chosen[index][1]
        if isinstance(outcome, Failure):
            continue
        if isinstance(kept, Failure) or outcome.confidence > kept.confidence:
            chosen[index] = (crop, outcome)
    return chosen


@dataclass
class OcrPipeline:
    """Detector and recogniser as one pipeline over whole images.

    Args:
        detector: a :class:`Detector` (loaded by :meth:`load`).
        recognizer: a :class:`Recognizer` (loaded by :meth:`load`); greedy decoding keeps
            the frames word splitting needs.
        classifier: a text-direction :class:`pipeline.classifier.Classifier`, or None.
        cls_threshold: a crop it reads "180" with a higher probability is turned 180 degrees.
        cls_verify: such a crop is read both ways and the more confident reading kept
            (:func:`settle_directions`); False: it is read turned only (PaddleOCR).
        split_words: cut line boxes into word boxes at recognised spaces.
        min_confidence: regions read with a lower recogniser confidence are dropped (counted).

    Crops at least the recogniser description's ``tall_ratio`` times as high as wide are
    turned 90 degrees (:func:`cut_crops`).
    """

    detector: Detector
    recognizer: Recognizer
    split_words: bool = True
    min_confidence: float = 0.5
    classifier: Classifier | None = None
    cls_threshold: float = CLS_THRESHOLD
    cls_verify: bool = True
    #: Seconds spent cutting crops, in the direction classifier and in the recogniser,
    #: summed over calls.
    crop_seconds: float = 0.0
    classify_seconds: float = 0.0
    recognise_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cls_threshold < 1.0:
            raise ToolchainError(f"the direction classifier's threshold {self.cls_threshold} "
                                 "must be in [0, 1)")

    def _models(self) -> list:
        return [m for m in (self.detector, self.classifier, self.recognizer) if m is not None]

    def load(self) -> OcrPipeline:
        """Load the models."""
        for model in self._models():
            model.load()
        return self

    def close(self) -> None:
        """Release the models."""
        for model in self._models():
            model.close()

    def upside_down_crops(self, crops: list[Crop]) -> set[int]:
        """The indices of the crops the direction classifier reads as upside down
        (:func:`pipeline.classifier.upside_down`); none without a classifier."""
        if self.classifier is None or not crops:
            return set()
        start = time.perf_counter()
        readings = self.classifier([c.pixels for c in crops])
        self.classify_seconds += time.perf_counter() - start
        return {i for i, r in enumerate(readings) if upside_down(r, self.cls_threshold)}

    def __enter__(self) -> OcrPipeline:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def recognise_boxes(self, images: Sequence[np.ndarray],
                        boxes: Sequence[Sequence[TextBox]]) -> list[ImageResult]:
        """Crop, recognise and (optionally) split the boxes of each image.

        Args:
            images: uint8 ``[h, w, 3]`` RGB pixels.
            boxes: each image's detected boxes.
        """
        start = time.perf_counter()
        crops = [cut_crops(image, image_boxes, self.recognizer.spec.tall_ratio)
                 for image, image_boxes in zip(images, boxes)]
        self.crop_seconds += time.perf_counter() - start
        flat = [crop for image_crops in crops for crop in image_crops]
        turned = self.upside_down_crops(flat)
        readings = direction_readings(flat, turned, self.cls_verify)
        start = time.perf_counter()
        outcomes = self.recognizer([c.pixels for c in readings]) if readings else []
        self.recognise_seconds += time.perf_counter() - start
        chosen = iter(settle_directions(flat, turned, readings, outcomes))
        placed = [[next(chosen) for _ in image_crops] for image_crops in crops]
        return [assemble([c for c, _ in pairs], [o for _, o in pairs], self.recognizer.spec,
                         self.split_words, self.min_confidence)
                for pairs in placed]

    def __call__(self, images: Sequence[np.ndarray]) -> list[ImageResult]:
        """Detect and recognise the text of each image (uint8 ``[h, w, 3]`` RGB), in order.

        Raises:
            EngineError: an engine failed on this call's images.
        """
        return self.recognise_boxes(images, self.detector(images))


#: Default models of :func:`open_pipeline` (registry names; see ``models.weights``).
DEFAULT_DETECTOR = "ppocr-v6-det"
DEFAULT_RECOGNIZER = "ppocr-v6-rec"
DEFAULT_CLASSIFIER = "ppocr-cls"


#: Precisions a registry name resolves to (:func:`resolve_model`).
PRECISIONS = ("int8", "fp32")
#: Where full images are read (:func:`open_pipeline`, the service's ``/ocr``), ``"int8"`` takes
#: the int8 copy of the detector only: with the recogniser's int8 copy too, e2e H-mean on the
#: held-out ICDAR 2015 images fell 0.014 for 2 % more images/s (docs/results/quantization.md).
FULL_IMAGE_INT8 = ("ppocr-v6-det",)
_WARNED_FP32: set[str] = set()


def resolve_model(model: str | Path, precision: str = "int8",
                  int8_names: Sequence[str] | None = None) -> tuple[Path, str | None]:
    """A model file for a path or a registry name with public weights (fetched if needed).

    With ``precision`` ``"int8"``, a name with an int8 copy (``int8_names``, default
    ``models.weights.INT8_COPIES``: the copies that hold their accuracy budget on their own
    test sets; :data:`FULL_IMAGE_INT8` where full images are read) resolves to that copy once
    it is built (the command ``INT8_COPIES`` names); until then to the fp32 weights, with
    a warning naming the command (once per name). A path is taken as it is.

    Returns:
        The file and, for a checkpoint, its architecture (else None).

    Raises:
        ToolchainError: neither an existing file nor a fetchable name, an unknown
            precision, or the fetch fails.
    """
    from models import weights
    from models.registry import ARCHS

    if precision not in PRECISIONS:
        raise ToolchainError(f"precision {precision!r} is unknown; use one of {PRECISIONS}")
    path = Path(model)
    if path.exists():
        return path, None
    if str(model) in weights.fetchable():
        int8_names = weights.INT8_COPIES if int8_names is None else int8_names
        if precision == "int8" and str(model) in int8_names:
            int8 = weights.int8_path(str(model))
            if int8.is_file():
                return int8, None
            if str(model) not in _WARNED_FP32:
                _WARNED_FP32.add(str(model))
                log.warning("%s: its int8 copy is not built (%s); using the fp32 weights",
                            model, weights.INT8_COPIES[str(model)])
        fetched = weights.fetch(str(model))
        arch = str(model) if fetched.suffix in (".pth", ".pt") and model in ARCHS else None
        return fetched, arch
    raise ToolchainError(f"{model}: no such model file, and not a model with public weights "
                         f"({', '.join(weights.fetchable())})")


def open_pipeline(
    detector: str | Path = DEFAULT_DETECTOR,
    recognizer: str | Path = DEFAULT_RECOGNIZER,
    device: str | None = None,
    *,
    classifier: str | Path | None = DEFAULT_CLASSIFIER,
    threads: int | None = None,
    spin: bool = True,
    detector_changes: dict | None = None,
    recognizer_changes: dict | None = None,
    rec_batch_size: int = 16,
    precision: str = "int8",
    **options,
) -> OcrPipeline:
    """An :class:`OcrPipeline` (not yet loaded) for two model files or registry names.

    Args:
        detector: a detector file (.onnx with a detector description, or an .om with its
            sidecar) or a registry name (``"ppocr-v6-det"``, ``"ppocr-v4-det"``).
        recognizer: a recogniser file (anything ``infer.open_model`` opens) or a registry
            name with public weights (``"ppocr-v6-rec"``, ``"ppocr-v4-rec"``, ``"nano-ocr"``).
        classifier: the text-direction classifier (a file or ``"ppocr-cls"``), or None
            for none.
        device, threads, spin: as ``infer.open_model``, for both models.
        detector_changes, recognizer_changes: fields of the descriptions to override
            (e.g. ``{"box_thresh": 0.6}``), validated.
        rec_batch_size: crops per recogniser batch.
        precision: how registry names resolve (:func:`resolve_model`): ``"int8"`` takes
            the built int8 copies of :data:`FULL_IMAGE_INT8` (the detector), ``"fp32"``
            never.
        options: :class:`OcrPipeline` fields (``split_words``, ``min_confidence``, ...).

    Raises:
        ToolchainError: a missing model, a detector file without a detector description,
            a recogniser file with one, or an invalid override.
    """
    from infer.open import open_model
    from models.cls_spec import ClassifierSpec
    from models.det_spec import DetectorSpec

    det_path, _ = resolve_model(detector, precision, FULL_IMAGE_INT8)
    det_runner, det_spec = open_model(det_path, device, expect=DetectorSpec, threads=threads,
                                      spin=spin)
    rec_path, arch = resolve_model(recognizer, precision, FULL_IMAGE_INT8)
    rec_runner, rec_spec = open_model(rec_path, device, expect=ModelSpec, threads=threads,
                                      spin=spin, arch=arch)
    det_spec = det_spec.replace(**(detector_changes or {}))
    rec_spec = rec_spec.replace(**(recognizer_changes or {}))
    direction = None
    if classifier is not None:
        cls_path, _ = resolve_model(classifier)
        cls_runner, cls_spec = open_model(cls_path, device, expect=ClassifierSpec,
                                          threads=threads, spin=spin)
        direction = Classifier(cls_runner, cls_spec, batch_size=rec_batch_size)
    return OcrPipeline(Detector(det_runner, det_spec),
                       Recognizer(rec_runner, rec_spec, batch_size=rec_batch_size),
                       classifier=direction, **options)
