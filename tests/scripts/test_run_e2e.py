"""scripts/run_e2e.sh, the README's main command, on a synthetic lmdb (fast, no real data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run_e2e(tmp_path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRNN_VENV": sys.prefix}  # reuse this environment, no reinstall
    proc = subprocess.run(
        ["bash", "scripts/run_e2e.sh", "--data", str(tmp_path / "no_such_lmdb"),
         "--output", str(tmp_path / "out"), *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generating a SYNTHETIC one" in proc.stdout
    assert "these figures are SYNTHETIC" in proc.stdout
    assert "atc --model=" in proc.stdout  # the ATC command is printed without CANN
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["samples"], report["scored"], report["failed"]) == (200, 200, 0)
    assert (tmp_path / "out" / "predictions.csv").is_file()
    assert "200 samples, 200 scored, 0 failed" in (tmp_path / "out" / "summary.txt").read_text()
    return proc


def test_run_e2e_on_synthetic_data_int8_by_default(tmp_path):
    proc = _run_e2e(tmp_path, "--calibration", str(tmp_path / "no_calibration_lmdb"))
    assert "calibrating on SYNTHETIC words instead" in proc.stdout
    assert "calibration 200 images" in proc.stdout
    assert "the int8 model was calibrated on SYNTHETIC words" in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"].endswith("nano_int8.onnx")
    assert report["policy"]["layout"] == "stream"  # one process from the lmdb by default
    assert "preprocess.parse_testdata" not in proc.stdout


def test_run_e2e_fp32_skips_quantisation_two_step(tmp_path):
    proc = _run_e2e(tmp_path, "--precision", "fp32", "--width-policy", "fixed", "--two-step")
    assert "infer.quantize" not in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"].endswith("nano_fixed.onnx")
    assert report["policy"]["width_policy"] == "fixed"
    assert report["policy"]["layout"] == "bucketed"  # the ModelZoo flow through .npy files
    assert "preprocess.parse_testdata" in proc.stdout


def test_run_e2e_rejects_unknown_options():
    proc = subprocess.run(["bash", "scripts/run_e2e.sh", "--fast"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option: --fast" in proc.stderr
    proc = subprocess.run(["bash", "scripts/run_e2e.sh", "--precision", "fp16"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown precision: fp16" in proc.stderr
