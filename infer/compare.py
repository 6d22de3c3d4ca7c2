"""Run two runners on the same feeds and compare their outputs (after Polygraphy's Comparator:
several runners on one data loader, compared per output).

The export check (``convert.pth2onnx``: PyTorch against ONNX Runtime), the rewrite check
(``convert.fix``: the model before and after) and the int8 check (``convert.quantize``: fp32
against int8) all call :func:`compare_runners` with runners from files or from memory
(``TorchRunner.from_module``, ``OnnxRuntimeRunner(onnx.ModelProto)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from common.errors import ToolchainError
from infer.base import Runner


@dataclass(frozen=True)
class OutputComparison:
    """One output of one feed, reference against candidate.

    Attributes:
        feed: the feed's position in the feeds given.
        output: the output's name.
        shape: the reference's output shape.
        max_abs_diff: the largest absolute difference of the two outputs (float).
        same_argmax: positions whose arg-max over the last axis (the classes, for logits)
            agree: what greedy CTC decoding reads.
        positions: positions compared by arg-max (the product of all but the last axis).
        same_side: elements on the same side of ``threshold`` in both outputs (a detector's
            probability map binarised as DB post-processing binarises it); 0 without one.
        elements: elements compared against ``threshold`` (the output's size); 0 without one.
    """

    feed: int
    output: str
    shape: tuple[int, ...]
    max_abs_diff: float
    same_argmax: int
    positions: int
    same_side: int = 0
    elements: int = 0


def compare_runners(reference: Runner, candidate: Runner,
                    feeds: Iterable[dict[str, np.ndarray]],
                    outputs: Iterable[str] | None = None,
                    threshold: float | None = None) -> list[OutputComparison]:
    """Run both loaded runners on each feed and compare the named outputs.

    Args:
        reference, candidate: loaded runners (``with`` or ``load()``).
        feeds: input name -> array, as ``Runner.infer`` takes.
        outputs: the outputs to compare (default: every output of the reference).
        threshold: also count the elements on the same side of it in both outputs
            (``value > threshold``).

    Returns:
        One :class:`OutputComparison` per feed and output, in order.

    Raises:
        ToolchainError: the candidate lacks an output, or its shape differs (the message
            names the feed's input shapes); EngineError: an engine failed.
    """
    found = []
    for number, feed in enumerate(feeds):
        expected, actual = reference.infer(feed), candidate.infer(feed)
        for name in outputs if outputs is not None else expected:
            if name not in actual:
                raise ToolchainError(f"{candidate.name} has no output {name!r} (it has "
                                     f"{', '.join(actual)})")
            want, got = expected[name], actual[name]
            if want.shape != got.shape:
                shapes = ", ".join(f"{key} {list(array.shape)}" for key, array in feed.items())
                raise ToolchainError(f"output {name} has shape {list(got.shape)} under "
                                     f"{candidate.name}, {list(want.shape)} under "
                                     f"{reference.name}, for inputs {shapes}")
            diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
            same_side = 0 if threshold is None else \
                int(((want > threshold) == (got > threshold)).sum())
            found.append(OutputComparison(
                number, name, tuple(want.shape), float(diff.max()) if diff.size else 0.0,
                int((want.argmax(-1) == got.argmax(-1)).sum()), int(np.prod(want.shape[:-1])),
                same_side, 0 if threshold is None else int(want.size)))
    return found
