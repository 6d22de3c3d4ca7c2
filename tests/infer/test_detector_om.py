"""The detector through ATC's plan and the ais_bench runner (the documented test double in
fake_ais_bench/), with the real PP-OCRv4 detector standing in for the compiled .om."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from convert import atc
from infer import open_model
from models.backends import describe
from models.det_spec import DetectorSpec
from pipeline.detector import Detector
from tests.conftest import render_line
from tests.infer.test_ais_bench_runner import fake_ais_bench  # noqa: F401 - fixture


def _om(tmp_path, ppocr_det_path, soc, name, extra=()):
    """``convert.atc --dry-run`` for the detector, and its ONNX bytes under the .om's name."""
    output = tmp_path / name
    assert atc.main(["--model", str(ppocr_det_path), "--output", str(output), "--soc-version",
                     soc, "--dry-run", *extra]) == 0
    om = output.with_suffix(".om")
    shutil.copy(ppocr_det_path, om)
    return om


def test_atc_argv_for_the_detector(tmp_path, ppocr_det_path, capsys):
    _om(tmp_path, ppocr_det_path, "Ascend310P3", "det")
    printed = capsys.readouterr().out
    assert "--input_shape=x:1~1,3,32~960,32~960" in printed and "--framework=5" in printed
    sidecar = json.loads((tmp_path / "det.json").read_text())
    assert sidecar["model"]["task"] == "text-detection" and sidecar["mode"] == "range"
    _om(tmp_path, ppocr_det_path, "Ascend310", "det310", ["--hw-gears", "544,960;960,960"])
    printed = capsys.readouterr().out
    assert "--input_shape=x:1,3,-1,-1" in printed
    assert "--dynamic_dims=544,960;960,960" in printed
    assert atc.main(["--model", str(ppocr_det_path), "--output", str(tmp_path / "bad"),
                     "--soc-version", "Ascend310", "--hw-gears", "540,960;960,960",
                     "--dry-run"]) == 1
    assert "not a positive multiple of its stride 32" in capsys.readouterr().err


@pytest.mark.parametrize("soc, extra", [("Ascend310P3", []),
                                        ("Ascend310", ["--hw-gears", "544,960;960,960"])])
def test_detector_runs_on_ais_bench_like_onnxruntime(tmp_path, ppocr_det_path, soc, extra,
                                                     fake_ais_bench):  # noqa: F811
    om = _om(tmp_path, ppocr_det_path, soc, "det", extra)
    assert isinstance(describe(om), DetectorSpec)
    line, _ = render_line(["OPEN", "DAILY"])
    image = np.full((500, 960, 3), 255, np.uint8)  # input 512 high: gear 544 pads it
    image[200:200 + line.shape[0], 100:100 + line.shape[1]] = line
    runner, spec = open_model(om, "npu:0", expect=DetectorSpec)
    with Detector(runner, spec) as on_npu:
        boxes = on_npu([image])[0]
    reference_runner, reference_spec = open_model(ppocr_det_path, expect=DetectorSpec)
    with Detector(reference_runner, reference_spec) as on_cpu:
        reference = on_cpu([image])[0]
    assert len(boxes) == len(reference) >= 1
    # Range: the same input, the same boxes. Gears: the input is padded from 512 to 544 rows,
    # which the convolutions near the edge see: boxes move by a pixel or two.
    tolerance = 1e-3 if soc == "Ascend310P3" else 3.0
    for got, want in zip(boxes, reference):
        np.testing.assert_allclose(got.points, want.points, atol=tolerance)
    modes = {c["mode"] for c in fake_ais_bench.calls if c["call"] == "infer"}
    assert modes == ({"dymshape"} if soc == "Ascend310P3" else {"dymdims"})
