"""A new backend is one runner module plus one row of ``models.backends.BACKENDS``: with only
those (a test double, ``tests.infer.fake_backend``), every tool opens its files: open_model,
describe, parse_testdata, eval.postprocess, the service's KServe metadata and the Ray
executor's resources."""

from __future__ import annotations

import json
import shutil

import pytest

from common.errors import ToolchainError
from eval import postprocess
from eval.ray_executor import _actor_resources
from infer import open_model
from models.backends import BACKENDS, Backend, backend_of, describe
from models.describe import describe_onnx
from models.det_spec import DetectorSpec
from models.spec import ModelSpec
from preprocess import parse_testdata
from tests.infer.fake_backend import FakeRunner


@pytest.fixture
def fake_model(monkeypatch, tmp_path, fixed_models):
    row = Backend("fake", "tests.infer.fake_backend:FakeRunner", (".fake",), ("cpu",),
                  "fake_platform", describe_onnx)
    monkeypatch.setitem(BACKENDS, "fake", row)
    path = tmp_path / "nano.fake"
    shutil.copyfile(fixed_models["nano-ocr"], path)
    return path


def test_open_model_and_describe_take_the_new_row(fake_model, fixed_models):
    runner, spec = open_model(fake_model)
    assert isinstance(runner, FakeRunner) and spec == describe(fixed_models["nano-ocr"])
    assert describe(fake_model) == spec and backend_of(fake_model).platform == "fake_platform"
    with pytest.raises(ToolchainError, match="takes device cpu, not cuda"):
        open_model(fake_model, "cuda")
    assert _actor_resources(None, "fake") == ("CPU", {"num_cpus": 1})


def test_eval_and_parse_testdata_run_the_new_backend(fake_model, fixed_models, tiny_lmdb,
                                                     tmp_path):
    reports = {}
    for name, model in [("fake", fake_model), ("onnx", fixed_models["nano-ocr"])]:
        out = tmp_path / f"{name}.json"
        assert postprocess.main(["--test-dir", str(tiny_lmdb), "--model", str(model),
                                 "--workers", "1", "--report", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["fake"]["backend"] == "fake" and reports["onnx"]["backend"] == "onnxruntime"
    assert [reports["fake"][k] for k in ("scored", "correct", "failed", "one_minus_ned")] == \
        [reports["onnx"][k] for k in ("scored", "correct", "failed", "one_minus_ned")]
    npy = tmp_path / "npy"
    assert parse_testdata.main(["--test_dir", str(tiny_lmdb), "--output_npy", str(npy),
                                "--model", str(fake_model), "--workers", "1"]) == 0
    manifest = json.loads((npy / "manifest.json").read_text())
    assert ModelSpec.from_dict(manifest["model"], "manifest") == describe(fake_model)


def test_the_service_reports_the_rows_platform(fake_model):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.service import ServeConfig, Service

    service = Service(ServeConfig(model=str(fake_model), name="m"))
    service.load()
    try:
        with TestClient(create_app(service)) as client:
            assert client.get("/v2/models/m").json()["platform"] == "fake_platform"
    finally:
        service.close()


def test_open_model_says_what_kind_of_model_a_file_is(fixed_models, ppocr_det_path):
    with pytest.raises(ToolchainError, match="a text detector, not a text recogniser"):
        open_model(ppocr_det_path)
    with pytest.raises(ToolchainError, match="a text recogniser, not a text detector"):
        open_model(fixed_models["nano-ocr"], expect=DetectorSpec)
    runner, spec = open_model(ppocr_det_path, expect=DetectorSpec)
    assert isinstance(spec, DetectorSpec)
    assert isinstance(open_model(fixed_models["nano-ocr"], expect=ModelSpec)[1], ModelSpec)
