"""scripts/run_e2e.sh, the README's main command, on synthetic lmdbs (fast, no real data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "CRNN_VENV": sys.prefix}  # reuse this environment, no reinstall


def _script(*options: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "run_e2e.sh"), *options], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=600, check=False)


def _synthetic_run(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = _script("--synthetic", "--output", str(tmp_path / "out"), *options)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generating SYNTHETIC word lmdbs" in proc.stdout
    assert "these figures are SYNTHETIC" in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["samples"], report["scored"], report["failed"]) == (200, 200, 0)
    assert report["data"]["synthetic"] is True and report["data"]["num_samples"] == 200
    assert report["data"]["path"].endswith("synthetic_lmdb")
    assert (tmp_path / "out" / "predictions.csv").is_file()
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "(SYNTHETIC data)" in summary and "200 samples, 200 scored, 0 failed" in summary
    return proc, report


def test_run_e2e_on_synthetic_data_int8_by_default(tmp_path):
    proc, report = _synthetic_run(tmp_path)
    assert "atc --model=" in proc.stdout  # the ATC command is printed without CANN
    assert "calibration 200 images" in proc.stdout
    assert "int8 LSTM" in proc.stdout  # the LSTM quantised too, for offline scoring
    assert report["model"].endswith("nano_int8.onnx")
    assert report["policy"]["layout"] == "stream"  # one process from the lmdb by default
    assert "preprocess.parse_testdata" not in proc.stdout


def test_run_e2e_fp32_skips_quantisation_two_step(tmp_path):
    proc, report = _synthetic_run(tmp_path, "--precision", "fp32", "--width-policy", "fixed",
                                  "--two-step")
    assert "convert.quantize" not in proc.stdout
    assert report["model"].endswith("nano_fixed.onnx")
    assert report["policy"]["width_policy"] == "fixed"
    assert report["policy"]["layout"] == "bucketed"  # the ModelZoo flow through .npy files
    assert "preprocess.parse_testdata" in proc.stdout


def test_run_e2e_torch_backend_skips_the_export(tmp_path):
    proc, report = _synthetic_run(tmp_path, "--backend", "torch")
    assert "convert.pth2onnx" not in proc.stdout and "atc --model=" not in proc.stdout
    assert report["backend"] == "torch"


@pytest.mark.parametrize(
    ("options", "message", "code"),
    [
        (["--fast"], "unknown option: --fast", 2),
        (["--precision", "fp16"], "unknown precision: fp16", 2),
        (["--lstm", "int4"], "unknown LSTM precision: int4", 2),
        (["--data"], "--data needs a value", 2),
        (["--data", "--synthetic"], "--data needs a value", 2),
        (["--data", "no/such/lmdb"], "no/such/lmdb: no lmdb there", 1),
        (["--backend", "ais_bench", "--synthetic"], "needs atc (CANN) and an NPU", 1),
    ],
)
def test_run_e2e_refuses_bad_options_before_any_work(tmp_path, options, message, code):
    proc = _script(*options, "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == code and message in proc.stderr
    assert "== environment" not in proc.stdout and not (tmp_path / "out").exists()


def test_run_e2e_resolves_relative_paths_from_the_callers_folder(tmp_path):
    (tmp_path / "calib").mkdir()
    proc = _script("--data", "mine/lmdb", "--output", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{tmp_path}/mine/lmdb: no lmdb there" in proc.stderr  # not the repository's folder
