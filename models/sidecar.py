"""The .om sidecar JSON's owner: the dynamic-shape plan of an ATC build (:class:`ShapePlan`),
and the sidecar that records it beside the .om with the SoC, the ATC command and the model
description (written by ``convert.atc``, read by ``describe`` and the ais_bench runner).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ToolchainError
from common.outputs import json_content, write_texts
from models.det_spec import Description, DetectorSpec, description_from_dict
from models.spec import ModelSpec


@dataclass(frozen=True)
class InputPlan:
    """The shape of one model input in an ATC build.

    Attributes:
        name: the input's name (from the model description).
        dims: one entry per dimension: an int for a static dimension, ``(min, max)`` for a
            dimension that varies in a range (range mode), or -1 for one that takes the gear
            values (gears mode).
    """

    name: str
    dims: tuple[int | tuple[int, int], ...]

    def atc_dims(self) -> str:
        """``--input_shape`` text for this input: ``1~16,1,32,96~192`` or ``16,1,32,-1``."""
        return ",".join(f"{d[0]}~{d[1]}" if isinstance(d, tuple) else str(d) for d in self.dims)

    def ranges(self) -> dict[int, tuple[int, int]]:
        """``{axis: (min, max)}`` of the ranged dimensions."""
        return {axis: d for axis, d in enumerate(self.dims) if isinstance(d, tuple)}

    def gear_axes(self) -> list[int]:
        """Axes whose value comes from the gears."""
        return [axis for axis, d in enumerate(self.dims) if d == -1]


@dataclass(frozen=True)
class ShapePlan:
    """The dynamic-shape plan of one build: a plan per input, and the gears if any.

    Attributes:
        mode: ``"range"`` or ``"gears"``.
        inputs: one :class:`InputPlan` per model input.
        gears: gears mode: each gear lists the values of every -1 dimension, inputs in
            order, as ATC's ``--dynamic_dims`` takes them; ascending.
    """

    mode: str
    inputs: tuple[InputPlan, ...]
    gears: tuple[tuple[int, ...], ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form used in the sidecar."""
        return {
            "mode": self.mode,
            "inputs": [
                {"name": i.name, "dims": [list(d) if isinstance(d, tuple) else d for d in i.dims]}
                for i in self.inputs
            ],
            "gears": [list(g) for g in self.gears],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ShapePlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            ToolchainError: the dict is not a plan written by :meth:`to_dict`.
        """
        try:
            inputs = tuple(
                InputPlan(
                    i["name"], tuple(tuple(d) if isinstance(d, list) else int(d) for d in i["dims"])
                )
                for i in data["inputs"]
            )
            plan = cls(
                data["mode"], inputs, tuple(tuple(int(v) for v in g) for g in data.get("gears", []))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolchainError(f"{source}: not a shape plan of convert.atc ({exc!r})") from None
        if plan.mode not in ("range", "gears") or not plan.inputs:
            raise ToolchainError(f"{source}: shape plan mode must be range or gears, with inputs")
        return plan


#: Keys every sidecar :func:`write_sidecar` writes has.
_SIDECAR_KEYS = {"mode", "soc_version", "atc_command", "model"}


def sidecar_written_here(path: Path) -> bool:
    """Whether ``path`` is a sidecar JSON that :func:`write_sidecar` wrote."""
    content = json_content(path)
    return isinstance(content, dict) and content.keys() >= _SIDECAR_KEYS


def om_built_here(path: Path) -> bool:
    """Whether the .om at ``path`` was built by this tool: its sidecar is this tool's."""
    return sidecar_written_here(path.with_suffix(".json"))


def read_sidecar(om_path: Path, sidecar: Path | None = None) -> tuple[ShapePlan, Description]:
    """The shape plan and model description in the sidecar JSON of an .om
    (default ``<om stem>.json``): a recogniser's ``ModelSpec`` or a detector's
    ``DetectorSpec``.

    Raises:
        ToolchainError: missing or unreadable sidecar, or one without a plan or a model
            description.
    """
    path = sidecar or om_path.with_suffix(".json")
    if not path.is_file():
        raise ToolchainError(
            f"{path}: no sidecar JSON beside {om_path.name}; build the model with "
            "`python -m convert.atc` (it writes one) or give the sidecar's path"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: unreadable sidecar ({exc})") from exc
    if not isinstance(data, dict) or not data.get("model"):
        raise ToolchainError(f"{path}: sidecar lacks the model description ('model')")
    return ShapePlan.from_dict(data, str(path)), description_from_dict(data["model"], str(path))


def write_sidecar(
    om_path: Path,
    plan: ShapePlan,
    spec: ModelSpec | DetectorSpec,
    soc_version: str,
    argv: list[str],
    onnx_path: Path,
) -> Path:
    """Write ``<om stem>.json`` with everything inference needs; return its path.

    Keys: ``mode``, ``inputs`` and ``gears`` (:meth:`ShapePlan.to_dict`), ``soc_version``,
    ``onnx``, ``atc_command`` and ``model`` (the model description). In gears mode the
    description's ``width_gears`` are the compiled widths, so preprocessing for this model
    (``parse_testdata --model X.om``) resizes to exactly those widths and nothing is padded.
    """
    if (isinstance(spec, ModelSpec) and plan.mode == "gears" and len(plan.inputs) == 1
            and plan.inputs[0].gear_axes() == [3]):
        spec = spec.replace(width_gears=tuple(g[0] for g in plan.gears))
    sidecar = om_path.with_suffix(".json")
    content = {**plan.to_dict(), "soc_version": soc_version, "onnx": str(onnx_path),
               "atc_command": argv, "model": spec.to_dict()}
    write_texts({sidecar: json.dumps(content, indent=2, ensure_ascii=False)})
    return sidecar
