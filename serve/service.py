"""The service behind the HTTP layer: admission, preprocessing pool, batcher, engine.

A request's life: admitted before its body is read (:meth:`Service.admit`: 503 when the
queue is full or its expected wait would pass the request's deadline) -> its images decoded
and resized by the model's width policy in the preprocessing pool, one image at a time and
round-robin between requests (:mod:`serve.pool`; 400/413 for bad images) -> queued in its
width's bucket (:mod:`serve.batcher`) -> one engine call with the other requests of its
width -> CTC decoding on the recogniser's decode thread -> the answer. The deadline runs from
the request's arrival; a request that cannot be answered before it is answered 504 and never
reaches the engine; an engine failure fails that batch's requests only (500).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from infer.open import open_model
from models.backends import backend_of, describe
from models.cls_spec import ClassifierSpec
from models.ctc import Decoded
from models.describe import describe_classifier
from models.det_spec import DetectorSpec
from models.onnx_file import load_onnx
from models.spec import ModelSpec, batch_dependent
from pipeline.classifier import Classification, Classifier, classifier_input, upside_down
from pipeline.detector import Detector
from pipeline.ocr import (
    FULL_IMAGE_INT8,
    ImageResult,
    assemble,
    cut_crops,
    direction_readings,
    resolve_model,
    settle_directions,
)
from pipeline.recognizer import Recognition, Recognizer, collapse, engine_lanes
from preprocess.image import (
    DECODABLE_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageTooLarge,
    SampleError,
    decode_rgb,
    detector_input,
    prepare,
    prepare_readings,
)
from serve.batcher import (
    ClassifierBatcher,
    DeadlineExceeded,
    DetectorBatcher,
    EngineFailed,
    QueueFull,
    Stopped,
    WidthBatcher,
)
from serve.metrics import ServiceMetrics
from serve.pool import FairPool

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service answers with an HTTP error.

    Attributes:
        status: the HTTP status code.
        message: one line naming the request's problem (the response's ``error``).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_image(exc: SampleError, where: str = "") -> ServiceError:
    """The answer to an image that cannot be used: 413 over a size cap, else 400 (with the
    accepted formats); ``where`` prefixes the message (``"image 2: "``)."""
    if isinstance(exc, ImageTooLarge):
        return ServiceError(413, f"{where}{exc}")
    return ServiceError(400, f"{where}{exc}; accepted formats: {', '.join(DECODABLE_FORMATS)}")


class State(enum.Enum):
    """Where the service stands: readiness is ``READY`` only."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class ServeConfig:
    """What ``python -m serve`` is told (see its ``--help`` for each option)."""

    model: Path | str
    name: str
    device: str | None = None
    sidecar: Path | None = None
    arch: str | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_request_images: int = 64
    timeout_ms: float = 10_000.0
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None
    lanes: int | None = None
    preprocess_threads: int = 1
    token: str | None = None
    det: Path | str | None = None
    det_max_batch_size: int = 4
    split_words: bool = True
    min_confidence: float = 0.5
    cls: Path | str | None = None
    cls_threshold: float = 0.9
    labels: tuple[str, ...] | None = None
    top_k: int = 5
    precision: str = "int8"


def _batch_dependent(model: Path) -> bool:
    """Whether ``model`` is an .onnx whose results depend on the batch
    (:func:`models.spec.batch_dependent`)."""
    if model.suffix != ".onnx":
        return False
    return batch_dependent(load_onnx(model, load_external_data=False))


def served_model(config: ServeConfig) -> tuple[Path, str | None, object]:
    """The model file ``config.model`` resolves to (with --det, as the offline pipeline
    resolves it: ``pipeline.ocr.FULL_IMAGE_INT8``), its registry architecture, and its
    description (a ``ModelSpec`` or ``ClassifierSpec``), read without loading an engine.

    Raises:
        ToolchainError: an unknown name, an unreadable file or description, ``--labels``
            with a file that is not .onnx.
    """
    full_image = FULL_IMAGE_INT8 if config.det is not None else None
    model, arch = resolve_model(config.model, config.precision, full_image)
    if config.labels is not None and model.suffix.lower() != ".onnx":
        raise ToolchainError(f"{model}: --labels describes an ONNX classifier; an "
                             f"{model.suffix} carries its labels in its description")
    kind = (describe_classifier(model, config.labels) if config.labels is not None
            else describe(model, config.arch or arch, config.sidecar))
    return model, arch, kind


class Service:
    """One model behind its engine lanes: a text recogniser (with ``det``, also whole
    images: a detector, the direction classifier ``cls``, the recogniser), or an image
    classifier (a file carrying a classifier description, or any single-input ONNX
    classifier given ``labels``).

    Args:
        config: the service's options.

    Raises:
        ToolchainError: the model cannot be opened (file, suffix, description, device).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        # The HTTP layer and the preprocessing pool share the cores with the engine: its idle
        # threads must not spin (onnxruntime #9800, #3099: pools fighting over cores).
        # With --det the recogniser also reads /ocr's crops: the names resolve as the offline
        # pipeline resolves them (FULL_IMAGE_INT8), so /ocr answers as open_pipeline does.
        model, arch, kind = served_model(config)
        #: The model file the name or path given resolved to.
        self.model_path = model
        #: Engine threads of the model's batcher, and intra-op threads of each.
        self.lanes, threads = engine_lanes(backend_of(model).name, config.device, config.lanes,
                                           config.threads)
        if isinstance(kind, ClassifierSpec):
            fallback = kind
            runner, spec = open_model(model, config.device, expect=ClassifierSpec,
                                      threads=threads, spin=False,
                                      sidecar=config.sidecar, fallback=fallback)
            spec = kind  # the labels given replace those of a description
        else:
            runner, spec = open_model(model, config.device, expect=ModelSpec,
                                      threads=threads, spin=False,
                                      sidecar=config.sidecar, arch=config.arch or arch)
        self.spec = spec
        if self.lanes > 1 and not runner.concurrent_infer:
            raise ToolchainError(f"{model}: its engine runs one call at a time; serve it with "
                                 f"--lanes 1 (got {self.lanes})")
        #: The backend's row (``models.backends``): its name, and the KServe platform.
        self.backend = backend_of(model)
        self.metrics = ServiceMetrics()
        self.recognizer: Recognizer | None = None
        self.classifier: Classifier | None = None
        if isinstance(spec, ClassifierSpec):
            if config.det is not None:
                raise ToolchainError(f"{model} is an image classifier; --det needs a text "
                                     "recogniser as --model")
            self.classifier = Classifier(runner, spec, batch_size=config.max_batch_size)
            self.batcher = ClassifierBatcher(self.classifier, config.max_batch_size,
                                             config.max_wait_ms / 1000.0, config.max_queue,
                                             on_batch=self.metrics.observe_batch,
                                             lanes=self.lanes)
        else:
            if config.max_batch_size > 1 and _batch_dependent(Path(model)):
                logger.warning("%s: its LSTM is quantised dynamically (convert.quantize --lstm "
                               "int8), so an answer can change with the requests batched beside "
                               "it; serve a model quantised with --lstm fp32 (the default) or "
                               "use --max-batch-size 1", model)
            self.recognizer = Recognizer(runner, spec, batch_size=config.max_batch_size)
            self.batcher = WidthBatcher(self.recognizer, config.max_batch_size,
                                        config.max_wait_ms / 1000.0, config.max_queue,
                                        on_batch=self.metrics.observe_batch, lanes=self.lanes)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self._preprocess = FairPool(config.preprocess_threads)
        self.detector: Detector | None = None
        self.det_batcher: DetectorBatcher | None = None
        #: The text-direction classifier of whole images' crops (``--cls``), and its batcher.
        self.direction: Classifier | None = None
        self.cls_batcher: ClassifierBatcher | None = None
        if config.det is not None and config.cls is not None:
            cls_path, _ = resolve_model(config.cls)
            cls_runner, cls_spec = open_model(cls_path, config.device, expect=ClassifierSpec,
                                              threads=config.threads, spin=False)
            self.direction = Classifier(cls_runner, cls_spec, batch_size=config.max_batch_size)
            self.cls_batcher = ClassifierBatcher(self.direction, config.max_batch_size,
                                                 config.max_wait_ms / 1000.0, config.max_queue)
        if config.det is not None:
            det_path, _ = resolve_model(config.det, config.precision, FULL_IMAGE_INT8)
            det_runner, det_spec = open_model(det_path, config.device, expect=DetectorSpec,
                                              threads=config.threads, spin=False)
            self.detector = Detector(det_runner, det_spec, config.det_max_batch_size)
            self.det_batcher = DetectorBatcher(self.detector, config.det_max_batch_size,
                                               config.max_wait_ms / 1000.0, config.max_queue)
        self.state = State.LOADING
        self.failure: str | None = None
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------
    def load(self) -> None:
        """Load the engine, warm it up at the batch sizes and widths it will see, start the
        engine thread; then readiness turns 200.

        Raises:
            ToolchainError, EngineError: the model cannot be loaded or run.
        """
        if self.classifier is not None:
            self.classifier.load()
            for size in sorted({1, self.config.max_batch_size}):
                self.classifier.run(np.zeros(self.spec.input_shape(size), np.float32))
        else:
            self.recognizer.load()
            self.warm_up()
        self.batcher.start()
        if self.detector is not None:
            self.detector.load()
            self.detector.probability_maps(np.zeros((1, 3, 64, 64), np.float32))  # warm-up
            self.det_batcher.start()
        if self.direction is not None:
            self.direction.load()
            self.direction.run(np.zeros(self.direction.spec.input_shape(1), np.float32))
            self.cls_batcher.start()
        with self._lock:
            if self.state is State.LOADING:
                self.state = State.READY
        logger.info("model %s loaded from %s (%s); ready", self.config.model, self.model_path,
                    self.backend.name)

    def warm_up(self) -> None:
        """One engine call at batch 1 and at ``max_batch_size`` for the narrowest and widest
        input, so the first requests do not pay for the engine's first allocations."""
        spec = self.spec
        widths = sorted({spec.resized_width(1, spec.height), spec.resized_width(1 << 16, 1)})
        for width in widths:
            for size in sorted({1, self.config.max_batch_size}):
                batch = np.zeros(spec.input_shape(size, width), np.float32)
                future = self.recognizer.submit(None, batch, [width] * size)
                result = future.result()
                if result.error is not None:
                    raise result.error

    def fail(self, reason: str) -> None:
        """Record that loading failed: readiness stays 503 with the reason."""
        with self._lock:
            self.state = State.FAILED
            self.failure = reason

    def begin_drain(self) -> None:
        """Readiness turns 503; queued buckets go to the engine without waiting to fill.
        Requests still arriving are served until the server stops listening."""
        with self._lock:
            if self.state in (State.READY, State.LOADING):
                self.state = State.DRAINING
        for batcher in (self.batcher, self.det_batcher, self.cls_batcher):
            if batcher is not None:
                batcher.flush()

    def close(self) -> None:
        """Finish queued requests, then release the engines and the pools."""
        timeout = self.config.timeout_ms / 1000.0 + 5.0
        if self.det_batcher is not None:
            self.det_batcher.close(timeout=timeout)
            self.detector.close()
        if self.cls_batcher is not None:
            self.cls_batcher.close(timeout=timeout)
            self.direction.close()
        self.batcher.close(timeout=timeout)
        self._preprocess.shutdown(wait=True)
        (self.classifier or self.recognizer).close()

    # -- requests ----------------------------------------------------------------------------
    def check_token(self, authorization: str | None) -> None:
        """Compare the ``Authorization: Bearer`` token in constant time (``hmac``).

        Raises:
            ServiceError: 401 when a token is set and the header is missing or wrong.
        """
        if self.config.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), self.config.token.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ServiceError(401, "a valid bearer token is required "
                                    "(header 'Authorization: Bearer TOKEN')",
                               {"WWW-Authenticate": 'Bearer realm="ocr"'})

    def check_ready(self) -> None:
        """Raises: ServiceError 503 while loading, or when loading failed."""
        if self.state is State.LOADING:
            raise ServiceError(503, "the model is loading; retry shortly", {"Retry-After": "1"})
        if self.state is State.FAILED:
            raise ServiceError(503, f"the model failed to load: {self.failure}")

    def deadline(self, arrival: float) -> float:
        """The ``time.monotonic()`` by which a request that arrived at ``arrival`` is
        answered (``--timeout-ms`` later)."""
        return arrival + self.config.timeout_ms / 1000.0

    def admit(self, arrival: float, whole_image: bool = False) -> None:
        """Decide on a request before its body is read (only its headers are in): refuse
        it when the service is not ready, its deadline has passed, or the queue it goes to
        (the detector's for ``whole_image``) is full or would not answer it in time.
        Nothing is reserved: the request is admitted for real once its images are counted.

        Raises:
            ServiceError: 503 (with ``Retry-After`` when the queue is full), 504.
        """
        self.check_ready()
        deadline = self.deadline(arrival)
        self._check_deadline(deadline, "before its body was read")
        batcher = self.det_batcher if whole_image else self.batcher
        if batcher is not None:
            self._admit(batcher, 1, deadline, reserve=False)

    def shed(self, method: str, path: str) -> str | None:
        """Whether to refuse a request on its headers, before the web framework sees it
        (:mod:`serve.protocol`): the reason for an inference request (``POST`` to
        ``/service``, ``/v2/models/.../infer``, ``/ocr``, ``/ocr/prediction``) whose queue is
        full or would not answer it within a deadline starting now; None for anything else,
        and while the service is not ready (the application then answers with its reason).
        A refusal is counted in the metrics as a 503 of its endpoint.
        """
        if method != "POST" or self.state is not State.READY:
            return None
        if path == "/service":
            endpoint, batcher = "service", self.batcher
        elif path.startswith("/v2/models/") and path.endswith("/infer"):
            endpoint, batcher = "infer", self.batcher
        elif path in ("/ocr", "/ocr/prediction") and self.det_batcher is not None:
            endpoint, batcher = path[1:].replace("/", "_"), self.det_batcher
        else:
            return None
        try:
            batcher.check_room(1, self.deadline(time.monotonic()))
        except (QueueFull, Stopped) as exc:
            self.metrics.observe_request(endpoint, 503, 0.0)
            return str(exc)
        return None

    def _check_deadline(self, deadline: float, when: str = "while its body was read"
                        ) -> None:
        """Raises: ServiceError 504 when ``deadline`` has passed."""
        if time.monotonic() >= deadline:
            raise ServiceError(504, f"the request's deadline ({self.config.timeout_ms:g} ms "
                                    f"from its arrival) passed {when}")

    def _prepare_one(self, raw: bytes, where: str, deadline: float
                     ) -> list[tuple[int, np.ndarray]]:
        """One image's readings (``preprocess.image.prepare_readings``: one, or three for
        a tall crop the model reads turned), unless the request's deadline has passed."""
        self._check_deadline(deadline, "before its images were decoded")
        try:
            return prepare_readings(raw, self.spec, self.config.max_pixels)[0]
        except SampleError as exc:
            raise bad_image(exc, where) from None

    async def _preprocessed(self, key: object, jobs: list[tuple[Callable, tuple]]) -> list:
        """Run ``jobs`` (function, arguments) in the fair preprocessing pool as request
        ``key``'s; on the first failure the request's jobs not yet started are dropped."""
        futures = [self._preprocess.submit(key, function, *args) for function, args in jobs]
        try:
            failed = await settled(futures)
        finally:
            for future in futures:
                future.cancel()
        return results(futures, failed)

    def _admit(self, batcher: WidthBatcher, count: int, deadline: float | None = None,
               reserve: bool = True) -> None:
        try:
            if reserve:
                batcher.reserve(count, deadline)
            else:
                batcher.check_room(count, deadline)
        except QueueFull as exc:
            raise ServiceError(503, str(exc), {"Retry-After": "1"}) from None
        except Stopped as exc:
            raise ServiceError(503, str(exc)) from None

    async def _gather(self, futures: list, deadline: float) -> list:
        """Await the batchers' futures until ``deadline``; their failures as ServiceErrors."""
        try:
            return results(futures, await settled(futures, deadline))
        except TimeoutError:
            raise ServiceError(504, f"no answer within the deadline "
                                    f"({self.config.timeout_ms:g} ms)") from None
        except DeadlineExceeded as exc:
            raise ServiceError(504, str(exc)) from None
        except EngineFailed as exc:
            raise ServiceError(500, f"the engine failed on this request's batch: {exc}") from None
        except Stopped as exc:
            raise ServiceError(503, str(exc)) from None
        finally:
            for future in futures:
                future.cancel()

    def _decode(self, raw: bytes, where: str = "") -> np.ndarray:
        """uint8 RGB pixels of one image; a bad one as its ServiceError (:func:`bad_image`)."""
        try:
            return decode_rgb(raw, self.config.max_pixels)
        except SampleError as exc:
            raise bad_image(exc, where) from None

    def _prepare_ocr(self, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        rgb = self._decode(raw)
        return rgb, detector_input(rgb, self.detector.spec)

    def _cut_crops(self, rgb: np.ndarray, boxes) -> tuple[list, list[np.ndarray]]:
        """The crops of ``boxes``, and the direction classifier's input of each (none
        without one)."""
        crops = cut_crops(rgb, boxes, self.spec.tall_ratio)
        if self.direction is None:
            return crops, []
        return crops, [classifier_input(c.pixels, self.direction.spec) for c in crops]

    def _prepare_crops(self, crops: list) -> list[np.ndarray]:
        return [prepare(c.pixels, self.spec)[0] for c in crops]

    async def _upside_down(self, inputs: list[np.ndarray], key: object,
                           deadline: float) -> set[int]:
        """The indices of the crops the direction classifier reads upside down (as
        ``pipeline.ocr.OcrPipeline.upside_down_crops`` does offline); none without one."""
        if self.cls_batcher is None or not inputs:
            return set()
        self._admit(self.cls_batcher, len(inputs), deadline)
        futures = [self.cls_batcher.submit(p, deadline, flow=key) for p in inputs]
        readings = await self._gather(futures, deadline)
        return {i for i, r in enumerate(readings) if upside_down(r, self.config.cls_threshold)}

    async def ocr(self, raw: bytes, arrival: float) -> ImageResult:
        """Detect and recognise the text of one whole image: the detector's batcher (equal
        input sizes), then each crop through the recogniser's (equal widths).

        Raises:
            ServiceError: 404 no detector loaded; 413 more text regions than ``max_queue``;
                otherwise as :meth:`recognise`.
        """
        if self.det_batcher is None:
            raise ServiceError(404, "this server has no text detector; start it with --det")
        self.check_ready()
        deadline = self.deadline(arrival)
        self._check_deadline(deadline)
        key = object()
        self._admit(self.det_batcher, 1, deadline)
        try:
            ((rgb, array),) = await self._preprocessed(key, [(self._prepare_ocr, (raw,))])
        except BaseException:
            self.det_batcher.release(1)
            raise
        size = (rgb.shape[1], rgb.shape[0])
        (boxes,) = await self._gather([self.det_batcher.submit(array, deadline, size)], deadline)
        if not boxes:
            return ImageResult()
        if len(boxes) > self.config.max_queue:  # it could never be admitted: not a 503
            raise ServiceError(413, f"{len(boxes)} text regions in one image; the queue holds "
                                    f"{self.config.max_queue} (--max-queue)")
        ((crops, cls_inputs),) = await self._preprocessed(key, [(self._cut_crops, (rgb, boxes))])
        turned = await self._upside_down(cls_inputs, key, deadline)
        readings = direction_readings(crops, turned, verify=True)
        (pixels,) = await self._preprocessed(key, [(self._prepare_crops, (readings,))])
        self._admit(self.batcher, len(pixels), deadline)
        futures = [self.batcher.submit(p, deadline, flow=key) for p in pixels]
        decoded = await self._gather(futures, deadline)
        outcomes = [Recognition.of(d, p.shape[1], (c.pixels.shape[1], c.pixels.shape[0]))
                    for d, p, c in zip(decoded, pixels, readings)]
        chosen = settle_directions(crops, turned, readings, outcomes)
        return assemble([c for c, _ in chosen], [o for _, o in chosen], self.spec,
                        self.config.split_words, self.config.min_confidence)

    def _check_request_images(self, images: list[bytes]) -> None:
        """Raises: ServiceError 400 for a request without images, 413 over
        ``max_request_images``."""
        if not images:
            raise ServiceError(400, "the request holds no image")
        if len(images) > self.config.max_request_images:
            raise ServiceError(413, f"{len(images)} images in one request; a request holds at "
                                    f"most {self.config.max_request_images} "
                                    f"(--max-request-images): send them in several requests")

    async def _admit_and_prepare(self, images: list[bytes], arrival: float,
                                 prepare: Callable[[bytes, str, float], object]
                                 ) -> tuple[float, object, list]:
        """Check and admit a request's images into the model's queue, then run ``prepare(raw,
        where, deadline)`` on each in the fair preprocessing pool; on a failure the images'
        places in the queue are released.

        Returns:
            The request's deadline, its key (its images' flow, taking turns with other
            requests') and what ``prepare`` made of each image, in order.

        Raises:
            ServiceError: 400, 413, 503, 504 (see :meth:`recognise`).
        """
        self.check_ready()
        self._check_request_images(images)
        deadline = self.deadline(arrival)
        self._check_deadline(deadline)
        self._admit(self.batcher, len(images), deadline)
        many = len(images) > 1
        key = object()
        try:
            prepared = await self._preprocessed(key, [
                (prepare, (raw, f"image {index}: " if many else "", deadline))
                for index, raw in enumerate(images)])
        except BaseException:
            self.batcher.release(len(images))
            raise
        return deadline, key, prepared

    def _classifier_input(self, raw: bytes, where: str, deadline: float) -> np.ndarray:
        """One image's classifier input, unless the request's deadline has passed."""
        self._check_deadline(deadline, "before its images were decoded")
        return classifier_input(self._decode(raw, where), self.spec)

    async def classify(self, images: list[bytes], arrival: float) -> list[Classification]:
        """Classify a request's images (each queued on its own; equal input sizes share an
        engine call).

        Returns:
            One ``pipeline.classifier.Classification`` per image, in order.

        Raises:
            ServiceError: 404 when the model is a recogniser; otherwise as :meth:`recognise`.
        """
        if self.classifier is None:
            raise ServiceError(404, "this server serves a text recogniser, not a classifier")
        deadline, key, inputs = await self._admit_and_prepare(images, arrival,
                                                              self._classifier_input)
        if time.monotonic() >= deadline:
            self.batcher.release(len(images))
            raise ServiceError(504, "the request's deadline passed while it was preprocessed")
        futures = [self.batcher.submit(p, deadline, flow=key) for p in inputs]
        return await self._gather(futures, deadline)

    async def recognise(self, images: list[bytes], arrival: float) -> list[Decoded]:
        """Recognise a request's images (each queued on its own, in its width's bucket).

        Args:
            images: encoded images.
            arrival: ``time.monotonic()`` when the request arrived (the deadline runs from
                it).

        Returns:
            One :class:`models.ctc.Decoded` per image, in order: for a tall crop the model
            reads turned, the most confident of its three readings (each is queued, and
            counts against the queue, on its own).

        Raises:
            ServiceError: 400 bad image, 413 too many pixels, 503 not ready / queue full /
                shutting down, 504 deadline passed, 500 engine failure.
        """
        if self.recognizer is None:
            raise ServiceError(404, "this server serves an image classifier, not a recogniser")
        deadline, key, readings = await self._admit_and_prepare(images, arrival,
                                                                self._prepare_one)
        turned = sum(len(r) for r in readings) - len(images)
        if len(images) + turned > self.config.max_queue:

            self.batcher.release(len(images))
            raise ServiceError(413, f"{len(images)} images make {len(images) + turned} readings "
                                    f"(tall crops are read three ways); the queue holds "
                                    f"{self.config.max_queue} (--max-queue)")
        if turned:
            try:
                self._admit(self.batcher, turned)
            except ServiceError:
                self.batcher.release(len(images))
                raise
        if time.monotonic() >= deadline:
            self.batcher.release(len(images) + turned)
            raise ServiceError(504, "the request's deadline passed while it was preprocessed")
        futures = [self.batcher.submit(p, deadline, flow=key) for r in readings for _, p in r]
        decoded = iter(await self._gather(futures, deadline))
        results = []
        for image_readings in readings:
            results.append(collapse([(turn, next(decoded)) for turn, _ in image_readings]))
        return results


def settled(futures: list[Future], deadline: float | None = None) -> asyncio.Future:
    """An asyncio future (of the running loop) done once every one of ``futures``
    (``concurrent.futures.Future``, completed on other threads) is done, or as soon as one
    fails or is cancelled: its result is that future, or None when all succeeded (read them
    with :func:`results`). Given ``deadline`` (``time.monotonic()`` seconds), it fails with
    ``TimeoutError`` if that comes first.

    One wake-up of the event loop per call, from the thread that completes the last future
    (or the first failure), where ``asyncio.wrap_future`` and ``asyncio.gather`` cost a
    wake-up and a chain of callbacks per future. Cancelling it leaves ``futures`` as they
    are.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    remaining = len(futures)
    lock = threading.Lock()

    def settle(failed: Future | None) -> None:
        if not done.done():
            done.set_result(failed)

    def finished(future: Future) -> None:  # on the thread that completed ``future``
        nonlocal remaining
        failed = future.cancelled() or future.exception() is not None
        with lock:
            if remaining < 0:
                return  # settled already
            remaining -= 1
            if not (failed or remaining == 0):
                return
            remaining = -1
        loop.call_soon_threadsafe(settle, future if failed else None)

    if deadline is not None:
        def expire() -> None:
            if not done.done():
                done.set_exception(TimeoutError())

        timer = loop.call_at(loop.time() + deadline - time.monotonic(), expire)
        done.add_done_callback(lambda _: timer.cancel())
    if not futures:
        done.set_result(None)
    for future in futures:
        future.add_done_callback(finished)
    return done


def results(futures: list[Future], failed: Future | None) -> list:
    """The results of ``futures`` in order, once :func:`settled` gave ``failed``.

    Raises:
        ``failed``'s exception (``concurrent.futures.CancelledError`` when it was cancelled).
    """
    if failed is not None:
        failed.result()  # raises
    return [future.result() for future in futures]


def freeze_heap() -> None:
    """Collect, then move every object alive into the garbage collector's permanent
    generation (``gc.freeze``, Python's gc module), for a process that serves one loaded
    service until it exits: the modules, the app and the engines then stay out of every later
    collection. Without it, a full collection walked them all under load (about 40 ms, every
    few seconds, on the event loop's thread or an engine's); the requests' own objects are
    collected as before."""
    gc.collect()
    gc.freeze()


def load_in_background(service: Service, on_failure: Callable[[str], None]) -> threading.Thread:
    """Load the service on a thread, then :func:`freeze_heap`; a load that fails marks the
    service failed and calls ``on_failure`` with the one-line reason (the server then
    exits)."""

    def run() -> None:
        try:
            service.load()
        except ToolchainError as exc:  # EngineError is a ToolchainError
            service.fail(str(exc))
            on_failure(str(exc))
            return
        freeze_heap()

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    return thread
