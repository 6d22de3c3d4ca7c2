"""scripts/run_e2e.sh, the README's main command, on a synthetic lmdb (fast, no real data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_run_e2e_on_synthetic_data(tmp_path):
    env = {**os.environ, "CRNN_VENV": sys.prefix}  # reuse this environment, no reinstall
    proc = subprocess.run(
        ["bash", "scripts/run_e2e.sh", "--data", str(tmp_path / "no_such_lmdb"),
         "--output", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generating a SYNTHETIC one" in proc.stdout
    assert "these figures are SYNTHETIC" in proc.stdout
    assert "atc --model=" in proc.stdout  # the ATC command is printed without CANN
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["samples"], report["scored"], report["failed"]) == (200, 200, 0)
    assert (tmp_path / "out" / "predictions.csv").is_file()
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "200 samples, 200 scored, 0 failed" in summary


def test_run_e2e_rejects_unknown_options():
    proc = subprocess.run(["bash", "scripts/run_e2e.sh", "--fast"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option: --fast" in proc.stderr
