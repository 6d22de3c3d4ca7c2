"""The image classifier through ATC's plan and the ais_bench runner (the documented test
double in fake_ais_bench/), with the real PP-OCR direction classifier standing in for the
compiled .om."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from convert import atc
from infer import open_model
from models import weights
from models.backends import describe
from models.cls_spec import ClassifierSpec
from pipeline.classifier import Classifier
from tests.conftest import render_line
from tests.infer.test_ais_bench_runner import fake_ais_bench  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def ppocr_cls():
    return weights.fetch("ppocr-cls")


def _om(tmp_path, model, soc, name, extra=()):
    """``convert.atc --dry-run`` for the classifier, and its ONNX bytes under the .om's name."""
    output = tmp_path / name
    assert atc.main(["--model", str(model), "--output", str(output), "--soc-version", soc,
                     "--dry-run", *extra]) == 0
    om = output.with_suffix(".om")
    shutil.copy(model, om)
    return om


def test_atc_argv_for_the_classifier(tmp_path, ppocr_cls, capsys):
    _om(tmp_path, ppocr_cls, "Ascend310P3", "cls")
    printed = capsys.readouterr().out
    assert "--input_shape=x:1~16,3,48,192" in printed and "--dynamic_dims" not in printed
    sidecar = json.loads((tmp_path / "cls.json").read_text())
    assert sidecar["model"]["task"] == "image-classification" and sidecar["mode"] == "range"
    _om(tmp_path, ppocr_cls, "Ascend310", "cls310", ["--max-batch", "6"])
    printed = capsys.readouterr().out
    assert "--input_shape=x:-1,3,48,192" in printed and "--dynamic_dims=1;2;4;6" in printed
    assert atc.main(["--model", str(ppocr_cls), "--output", str(tmp_path / "one"),
                     "--soc-version", "Ascend310", "--max-batch", "1", "--dry-run"]) == 1
    assert "widen the batch range" in capsys.readouterr().err


@pytest.mark.parametrize("soc, extra", [("Ascend310P3", []), ("Ascend310", ["--max-batch", "4"])])
def test_classifier_runs_on_ais_bench_like_onnxruntime(tmp_path, ppocr_cls, soc, extra,
                                                       fake_ais_bench):  # noqa: F811
    om = _om(tmp_path, ppocr_cls, soc, "cls", extra)
    assert isinstance(describe(om), ClassifierSpec)
    lines = [render_line(words)[0] for words in (["OPEN"], ["EXIT", "2026"], ["Free", "park"])]
    images = [p for line in lines for p in (line, np.ascontiguousarray(line[::-1, ::-1]))]
    runner, spec = open_model(om, "npu:0", expect=ClassifierSpec)
    with Classifier(runner, spec, batch_size=len(images)) as on_npu:  # 6: over gear 4
        got = on_npu(images)
    reference_runner, reference_spec = open_model(ppocr_cls, expect=ClassifierSpec)
    with Classifier(reference_runner, reference_spec) as on_cpu:
        want = on_cpu(images)
    np.testing.assert_allclose([g.probabilities for g in got], [w.probabilities for w in want],
                               atol=1e-5)
    assert [g.label for g in got] == ["0", "180"] * 3
    infers = [c for c in fake_ais_bench.calls if c["call"] == "infer"]
    assert {c["mode"] for c in infers} == ({"dymshape"} if soc == "Ascend310P3" else {"dymdims"})
