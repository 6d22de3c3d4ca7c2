"""convert.atc: the argv table for both modes, bad arguments, and running a fake ATC."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import textwrap

import pytest

from common.errors import ToolchainError
from convert import atc

FAKE_ATC = textwrap.dedent(f"""\
    #!{sys.executable}
    # TEST DOUBLE for Huawei's `atc` (CANN). It does not compile anything: it records its
    # argv in $FAKE_ATC_LOG, then either fails like ATC (FAKE_ATC_FAIL set: messages on
    # stderr, return code 3) or writes a placeholder model where ATC would, with the
    # `_linux_<arch>` suffix ATC appends to dynamic-shape models unless FAKE_ATC_NO_SUFFIX.
    import json, os, sys
    args = sys.argv[1:]
    open(os.environ["FAKE_ATC_LOG"], "w").write(json.dumps(args))
    if os.environ.get("FAKE_ATC_FAIL"):
        sys.stderr.write("ATC start working now, please wait for a moment.\\n"
                         "E10001: Value [imgs:1~16] for parameter [--input_shape] is invalid.\\n")
        sys.exit(3)
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    suffix = "" if os.environ.get("FAKE_ATC_NO_SUFFIX") else "_linux_x86_64"
    open(output + suffix + ".om", "wb").write(b"fake om")
""")


@pytest.fixture
def fake_atc(tmp_path, monkeypatch):
    """Put the documented fake `atc` first on PATH; return the file its argv lands in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "atc"
    script.write_text(FAKE_ATC)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "atc_args.json"
    monkeypatch.setenv("FAKE_ATC_LOG", str(log))
    return log


def _plan(soc, mode, **kwargs):
    """A CRNN input plan: imgs [N, 1, 32, W], narrowest accepted width 4."""
    return atc.plan_shape(soc, "imgs", 1, 32, mode, min_accepted_width=4, **kwargs)


def test_a_three_channel_height_48_input():
    plan = atc.plan_shape("Ascend310P3", "x", 3, 48, min_width=48, max_width=480)
    argv = atc.build_atc_command("rec.onnx", "om/rec", "Ascend310P3", plan)
    assert "--input_shape=x:1~16,3,48,48~480" in argv
    gears = atc.plan_shape("Ascend310", "x", 3, 48, width_gears=[320, 160])
    argv = atc.build_atc_command("rec.onnx", "om/rec", "Ascend310", gears)
    assert "--input_shape=x:16,3,48,-1" in argv and "--dynamic_dims=160;320" in argv
    assert atc.ShapePlan.from_dict(gears.to_dict(), "here") == gears


@pytest.mark.parametrize(
    ("soc", "mode", "kwargs", "expected"),
    [
        ("Ascend310P3", "auto", {}, ["--input_shape=imgs:1~16,1,32,32~320"]),
        ("Ascend910B", "range", {"min_batch": 2, "max_batch": 8, "min_width": 96, "max_width": 192},
         ["--input_shape=imgs:2~8,1,32,96~192"]),
        ("Ascend310", "auto", {"width_gears": [128, 64, 96]},
         ["--input_shape=imgs:16,1,32,-1", "--dynamic_dims=64;96;128"]),
        ("Ascend310P3", "gears", {"min_width": 96, "max_width": 150},
         ["--input_shape=imgs:16,1,32,-1", "--dynamic_dims=96;112;128;144;150"]),
    ],
)
def test_argv_table(soc, mode, kwargs, expected):
    shape = _plan(soc, mode, **kwargs)
    argv = atc.build_atc_command("m.onnx", "om/m", soc, shape, precision_mode="force_fp32")
    assert argv[:5] == ["atc", "--model=m.onnx", "--framework=5", "--output=om/m",
                        "--input_format=ND"]
    assert argv[5:5 + len(expected)] == expected
    assert argv[-3:] == ["--log=error", f"--soc_version={soc}", "--precision_mode=force_fp32"]


@pytest.mark.parametrize(
    ("soc", "mode", "kwargs", "message"),
    [
        ("Ascend310P3", "auto", {"min_batch": 8, "max_batch": 4}, "batch range 8~4"),
        ("Ascend310P3", "auto", {"min_width": 320, "max_width": 32}, "min > max"),
        ("Ascend310P3", "auto", {"min_width": 2}, "below the network's minimum input width 4"),
        ("Ascend310", "gears", {"width_gears": [64]}, "1 width gears given; ATC needs 2 to 100"),
        ("Ascend310", "gears", {"width_gears": list(range(8, 8 + 101))}, "101 width gears"),
        ("Ascend310", "gears", {"width_gears": [2, 64]}, "gear 2 is below"),
        ("Ascend310", "range", {}, "no shape-range support"),
        ("310P3", "auto", {}, "does not look like Ascend"),
        ("Ascend310P3", "bucket", {}, "mode 'bucket' is unknown"),
    ],
)
def test_bad_arguments(soc, mode, kwargs, message):
    with pytest.raises(ToolchainError, match=message):
        _plan(soc, mode, **kwargs)


def test_runs_fake_atc_finds_suffix_and_writes_sidecar(tmp_path, fake_atc, fixed_models, capsys):
    output = tmp_path / "om" / "nano"
    rc = atc.main(["--model", str(fixed_models["nano-ocr"]), "--output", str(output),
                   "--soc_version", "Ascend310P3"])
    assert rc == 0
    args = json.loads(fake_atc.read_text())
    assert "--input_shape=imgs:1~16,1,32,96~192" in args  # widths from the model metadata
    om = tmp_path / "om" / "nano_linux_x86_64.om"
    assert om.is_file()
    sidecar = json.loads(om.with_suffix(".json").read_text())
    assert sidecar["mode"] == "range"
    assert sidecar["inputs"] == [{"name": "imgs", "dims": [[1, 16], 1, 32, [96, 192]]}]
    assert sidecar["model"]["arch"] == "nano-ocr"
    assert f"sidecar {om.with_suffix('.json')}" in capsys.readouterr().out


def test_gears_chosen_for_ascend310(tmp_path, fake_atc, fixed_models, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_ATC_NO_SUFFIX", "1")
    caplog.set_level(logging.INFO)
    output = tmp_path / "crnn"
    assert atc.main(["--model", str(fixed_models["crnn-meijieru"]), "--output", str(output),
                     "--soc_version", "Ascend310", "--width-gears", "32,100,320"]) == 0
    assert "has no shape-range support" in caplog.text
    assert "--dynamic_dims=32;100;320" in json.loads(fake_atc.read_text())
    sidecar = json.loads((tmp_path / "crnn.json").read_text())
    assert sidecar["gears"] == [[32], [100], [320]]
    assert sidecar["inputs"] == [{"name": "imgs", "dims": [16, 1, 32, -1]}]


def test_failure_reports_code_and_stderr_tail(tmp_path, fake_atc, fixed_models, monkeypatch,
                                              capsys):
    monkeypatch.setenv("FAKE_ATC_FAIL", "1")
    assert atc.main(["--model", str(fixed_models["nano-ocr"]), "--output", str(tmp_path / "x"),
                     "--soc_version", "Ascend310P3"]) == 1
    err = capsys.readouterr().err
    assert "atc failed with return code 3" in err and "E10001" in err


def test_missing_atc_names_set_env(tmp_path, fixed_models, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert atc.main(["--model", str(fixed_models["nano-ocr"]), "--output", str(tmp_path / "x"),
                     "--soc_version", "Ascend310P3"]) == 1
    assert "set_env.sh" in capsys.readouterr().err


def test_files_atc_did_not_build_are_not_replaced(tmp_path, fake_atc, fixed_models, capsys):
    """An .om under either name ATC gives it without this tool's sidecar beside it, or a
    sidecar path holding another file, is refused before ATC runs and left as it was; the
    tool's own earlier build is rebuilt."""
    argv = ["--model", str(fixed_models["nano-ocr"]), "--output", str(tmp_path / "nano"),
            "--soc_version", "Ascend310P3"]
    for name in ("nano_linux_x86_64.om", "nano.om", "nano.json"):
        victim = tmp_path / name
        victim.write_bytes(b"someone else's")
        assert atc.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {victim}: exists and was not written by convert.atc; nothing "
                       "was changed; give --output a new path (or move that file away)"), err
        assert victim.read_bytes() == b"someone else's"
        assert not fake_atc.exists()  # ATC never ran
        victim.unlink()
    assert atc.main(argv) == 0
    om = tmp_path / "nano_linux_x86_64.om"
    om.write_bytes(b"an older build")
    assert atc.main(argv) == 0  # its own build (its sidecar beside it): replaced
    assert om.read_bytes() == b"fake om"


def test_dry_run_prints_without_running(tmp_path, fixed_models, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no atc: dry run must not need it
    output = tmp_path / "om" / "nano"
    assert atc.main(["--model", str(fixed_models["nano-ocr"]), "--output", str(output),
                     "--soc_version", "Ascend310P3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("atc --model=") and f"sidecar {output}.json" in out
    assert json.loads((tmp_path / "om" / "nano.json").read_text())["model"]["arch"] == "nano-ocr"
    assert not list((tmp_path / "om").glob("*.om"))  # nothing was built


def test_success_without_output_file_is_an_error(tmp_path):
    with pytest.raises(ToolchainError, match="wrote neither nano.om"):
        atc.find_om(tmp_path / "nano")
