"""The runner interface every backend implements (after NVIDIA Polygraphy's runners).

A runner has a cheap constructor, ``load()``, ``infer(feed) -> outputs`` on dicts of named
numpy arrays, and ``close()``, and is a context manager. The base class checks the feed
against the engine's input metadata (names, dtypes, ranks, static dimensions, and any
shape range), times only the engine call, and turns the engine's own exceptions (the
backend's :attr:`Runner.engine_errors`) into :class:`common.errors.EngineError`; each
backend implements ``_load``, ``_infer``, ``_close`` and ``input_specs``. Backends take
tensor names and shapes from the model description, never from literals.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import EngineError, ToolchainError


@dataclass(frozen=True)
class InputSpec:
    """One engine input.

    Attributes:
        name: input name, from the model.
        dtype: numpy dtype the engine takes.
        shape: one entry per dimension: an int for a static dimension, ``None`` for a
            dynamic one.
        ranges: optional ``{axis: (min, max)}`` bounds of dynamic dimensions (inclusive).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    ranges: dict[int, tuple[int, int]] | None = None


@dataclass(frozen=True)
class OpenOptions:
    """Backend-specific settings for opening a model file (``infer.open_model``); each
    backend reads the ones it has and ignores the rest.

    Attributes:
        threads: ONNX Runtime intra-op threads (default: the available cores), or PyTorch's
            CPU threads (default: its own).
        spin: ONNX Runtime's idle threads spin-wait.
        sidecar: an .om's sidecar JSON (default: beside it).
        rnn_layout, gate_order, trust: checkpoint loading (``models.checkpoint``).
    """

    threads: int | None = None
    spin: bool = True
    sidecar: Path | None = None
    rnn_layout: str = "auto"
    gate_order: str = "ifgo"
    trust: bool = False


class Runner:
    """Base class of the backends; see the module docstring."""

    #: Name used on the command line and in reports.
    name = "base"
    #: Top-level module whose presence makes the backend usable, or None.
    requires: str | None = None
    #: Exception types the engine raises for a batch it cannot run; set by ``_load``.
    engine_errors: tuple[type[BaseException], ...] = ()
    #: Whether ``infer`` may be called from several threads at once (engine lanes,
    #: ``pipeline.Recognizer(lanes=N)``); backends whose engine documents this set it.
    concurrent_infer = False

    def __init__(self) -> None:
        self.loaded = False
        self._timing = threading.local()

    @property
    def last_engine_seconds(self) -> float:
        """Seconds the calling thread's last ``infer`` spent in the engine call alone
        (per thread, so concurrent lanes each read their own)."""
        return getattr(self._timing, "seconds", 0.0)

    @last_engine_seconds.setter
    def last_engine_seconds(self, seconds: float) -> None:
        self._timing.seconds = seconds

    @classmethod
    def from_file(cls, path: Path, spec, device, options: OpenOptions) -> Runner:
        """The runner (not loaded) for model file ``path`` described by ``spec`` (a
        ``ModelSpec`` or ``DetectorSpec``) on ``device`` (an ``infer.device.Device`` of a kind
        the backend's row lists); what ``infer.open_model`` calls for the backend's row."""
        raise NotImplementedError(f"{cls.__name__} does not open model files")

    @classmethod
    def is_available(cls) -> bool:
        """Whether the backend's engine can be imported here (nothing is imported)."""
        return cls.requires is None or importlib.util.find_spec(cls.requires) is not None

    def load(self) -> Runner:
        """Load the engine. Raises :class:`ToolchainError` when it cannot be loaded."""
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def close(self) -> None:
        """Release the engine."""
        if self.loaded:
            self._close()
            self.loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: input name -> array, checked against :meth:`input_specs`.

        Returns:
            Output name -> array.

        Raises:
            ToolchainError: the runner is not loaded, or the feed does not fit the engine.
            EngineError: the engine failed on this batch (its message, first line).
        """
        if not self.loaded:
            raise ToolchainError(f"{self.name} runner: call load() before infer()")
        self.check_feed(feed)
        try:
            return self._infer(feed)
        except self.engine_errors as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise EngineError(f"{self.name}: {type(exc).__name__}: {first}") from exc

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Raise :class:`ToolchainError` naming what in ``feed`` does not fit the engine."""
        specs = {spec.name: spec for spec in self.input_specs()}
        for name in feed:
            if name not in specs:
                raise ToolchainError(f"input {name!r} not in the model; inputs are: "
                                     f"{', '.join(specs)}")
        for name, spec in specs.items():
            if name not in feed:
                raise ToolchainError(f"input {name!r} missing from the feed")
            array = feed[name]
            if array.dtype != spec.dtype:
                raise ToolchainError(f"input {name!r} has dtype {array.dtype}; the model takes "
                                     f"{np.dtype(spec.dtype)}")
            if array.ndim != len(spec.shape):
                raise ToolchainError(f"input {name!r} has shape {array.shape}; the model takes "
                                     f"rank {len(spec.shape)} {spec.shape}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and got != want:
                    raise ToolchainError(f"input {name!r} has {got} on axis {axis}; the model "
                                         f"takes {want} (shape {spec.shape})")
            for axis, (low, high) in (spec.ranges or {}).items():
                if not low <= array.shape[axis] <= high:
                    raise ToolchainError(
                        f"input {name!r} has {array.shape[axis]} on axis {axis}, outside the "
                        f"model's range {low}~{high}")

    def _timed(self, call, *args, **kwargs):
        """Run ``call`` and record its wall time in :attr:`last_engine_seconds`."""
        start = time.perf_counter()
        result = call(*args, **kwargs)
        self.last_engine_seconds = time.perf_counter() - start
        return result

    # Backends implement these.
    def input_specs(self) -> list[InputSpec]:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError
