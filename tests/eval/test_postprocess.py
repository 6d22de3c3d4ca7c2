"""eval.postprocess end to end: tiny lmdb -> inputs -> report, and the real IIIT5K check."""

from __future__ import annotations

import csv
import json

import pytest

from convert import quantize
from eval import compare, postprocess
from eval.evaluate import run_evaluation
from eval.inputs import load_input_set
from infer import OnnxRuntimeRunner
from infer.onnxruntime_runner import available_cores
from models.onnx_file import read_onnx_spec
from pipeline import Recognizer
from preprocess import parse_testdata
from preprocess.lmdb_reader import default_calibration_set
from tests.conftest import IIIT5K


@pytest.fixture
def tiny_inputs(tmp_path, tiny_lmdb, exported):
    out = tmp_path / "inputs"
    assert parse_testdata.main(["--test_dir", str(tiny_lmdb), "--output_npy", str(out),
                                "--model", str(exported["nano-ocr"]), "--width-policy",
                                "keep-ratio", "--workers", "1"]) == 0
    return out


def test_report_end_to_end(tmp_path, tiny_inputs, fixed_models, capsys):
    report_path, csv_path = tmp_path / "r" / "report.json", tmp_path / "r" / "predictions.csv"
    assert postprocess.main(["--input_npy", str(tiny_inputs), "--onnx_path",
                             str(fixed_models["nano-ocr"]), "--report", str(report_path),
                             "--predictions", str(csv_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert "10 samples, 7 scored, 3 failed" in line and "E2E" in line
    report = json.loads(report_path.read_text())
    for key in ("samples", "scored", "failed", "accuracy", "accuracy_case_sensitive",
                "one_minus_ned", "cer", "protocol", "backend", "model", "e2e_seconds",
                "images_per_second", "stages", "latency_ms", "engine_seconds_sum",
                "accuracy_by_width"):
        assert key in report
    assert (report["samples"], report["scored"], report["failed"]) == (10, 7, 3)
    assert {f["index"] for f in report["failures"]} == {7, 8, 10}
    assert set(report["stages"]) == {"read", "engine", "decode", "score"}
    batch_files = len({p.name for p in tiny_inputs.glob("batch_*.npy")})
    assert report["latency_ms"]["batches"] == batch_files
    assert report["latency_ms"]["p50"] > 0 and report["engine_seconds_sum"] > 0
    assert "0-9a-z" in report["protocol"] and report["backend"] == "onnxruntime"
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["index"]) for r in rows] == [1, 2, 3, 4, 5, 6, 9]
    assert set(rows[0]) == {"index", "label", "prediction", "confidence", "correct", "width"}
    assert sum(int(r["correct"]) for r in rows) == report["correct"]


def ctc_nll(logits, text, spec) -> float:
    """-log P(text | logits) under CTC (torch's ctc_loss), logits (T, 1, C)."""
    import torch

    log_probs = torch.from_numpy(logits).log_softmax(-1)
    target = torch.tensor([spec.charset.encode(text)], dtype=torch.long)
    return float(torch.nn.functional.ctc_loss(
        log_probs, target, [logits.shape[0]], [len(text)], blank=spec.blank, reduction="sum"))


def test_torch_backend_and_beam_decoder_agree_with_onnx(tmp_path, tiny_inputs, nano_weights,
                                                        fixed_models):
    def predictions(*args):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.csv"
        assert postprocess.main(["--input_npy", str(tiny_inputs), *args, "--predictions",
                                 str(out)]) == 0
        return compare.read_predictions(out)

    onnx = predictions("--onnx_path", str(fixed_models["nano-ocr"]))
    torch = predictions("--pth", str(nano_weights), "--arch", "nano-ocr")
    beam = predictions("--onnx-path", str(fixed_models["nano-ocr"]), "--decoder", "beam",
                       "--beam-width", "5")
    assert compare.compare(onnx, torch) == {"common": 7, "differ": 0, "only_first": 0,
                                            "only_second": 0, "examples": []}
    # The beam's label must be at least as probable under CTC as the best path's label.
    spec = read_onnx_spec(fixed_models["nano-ocr"])
    with OnnxRuntimeRunner(fixed_models["nano-ocr"]) as runner:
        for array, samples, _ in load_input_set(tiny_inputs).batches():
            logits = runner.infer({"imgs": array})["output1"]
            for row, sample in enumerate(samples):
                frames = spec.frames(sample.width)
                scores = logits[:frames, row:row + 1]
                assert ctc_nll(scores, beam[sample.index], spec) <= \
                    ctc_nll(scores, onnx[sample.index], spec) + 1e-4


def test_modelzoo_folder_with_label_txt(tmp_path, tiny_lmdb, fixed_models, capsys):
    out = tmp_path / "zoo"
    parse_testdata.main(["--test_dir", str(tiny_lmdb), "--output_npy", str(out), "--arch",
                         "nano-ocr", "--layout", "per-image", "--workers", "1"])
    (out / "manifest.json").unlink()  # what ModelZoo's parse_testdata leaves: npy + label.txt
    assert postprocess.main(["--input_npy", str(out), "--onnx_path",
                             str(fixed_models["nano-ocr"])]) == 1
    assert "pass --label" in capsys.readouterr().err
    assert postprocess.main(["--input_npy", str(out), "--onnx_path",
                             str(fixed_models["nano-ocr"]), "--label", str(out / "label.txt")]) == 0
    assert "7 samples, 7 scored, 0 failed" in capsys.readouterr().out


def test_inputs_for_another_model_are_refused(tiny_inputs, fixed_models, capsys):
    assert postprocess.main(["--input_npy", str(tiny_inputs), "--onnx_path",
                             str(fixed_models["crnn-meijieru"])]) == 1
    assert "preprocessed for 'nano-ocr'" in capsys.readouterr().err


def _narrow_inputs(tmp_path, tiny_lmdb, exported):
    out = tmp_path / "narrow"
    parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(out), "--model",
                         str(exported["nano-ocr"]), "--width-policy", "keep-ratio",
                         "--min-width", "4", "--max-width", "400", "--workers", "1"])
    return load_input_set(out)


class RejectsWide(OnnxRuntimeRunner):
    """An engine with a compiled maximum width: ONNX Runtime's own failure above 200 px."""

    def _infer(self, feed):
        if feed["imgs"].shape[3] > 200:
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail

            raise Fail("width above the compiled range")
        return super()._infer(feed)


def test_engine_failures_are_recorded_per_sample(tmp_path, tiny_lmdb, exported, fixed_models):
    inputs = _narrow_inputs(tmp_path, tiny_lmdb, exported)
    spec = read_onnx_spec(exported["nano-ocr"])
    with Recognizer(RejectsWide(fixed_models["nano-ocr"]), spec) as recognizer:
        run = run_evaluation(recognizer, inputs)
    assert [f["index"] for f in run.failed] == [9]  # the very wide image
    assert "Fail: width above the compiled range" in run.failed[0]["reason"]
    assert len(run.predictions) == 6


def test_report_says_what_its_accuracy_is_over(tmp_path, tiny_lmdb, exported, fixed_models):
    """With a failed sample, accuracy (over the scored ones) and accuracy over all samples
    differ: the report names its basis and the summary line gives both."""
    inputs = _narrow_inputs(tmp_path, tiny_lmdb, exported)
    spec = read_onnx_spec(exported["nano-ocr"])
    with Recognizer(RejectsWide(fixed_models["nano-ocr"]), spec) as recognizer:
        run = run_evaluation(recognizer, inputs)
    report = postprocess.make_report(run, inputs, spec, "onnxruntime", "m.onnx", "greedy")
    assert report["accuracy_basis"].startswith("scored samples")
    assert report["accuracy"] == report["correct"] / report["scored"]
    assert report["accuracy_over_all_samples"] == report["correct"] / report["samples"]
    line = postprocess.summary_line(report)
    assert (f"word accuracy {report['accuracy']:.4f} ({report['correct']}/{report['scored']} "
            "scored") in line
    assert f"over all samples {report['accuracy_over_all_samples']:.4f}" in line
    run.failed.clear()  # nothing failed: one figure
    inputs.failed.clear()
    assert "over all samples" not in postprocess.summary_line(
        postprocess.make_report(run, inputs, spec, "onnxruntime", "m.onnx", "greedy"))


def test_a_bug_in_the_runner_is_not_recorded_as_a_failure(tmp_path, tiny_lmdb, exported,
                                                         fixed_models):
    class Buggy(OnnxRuntimeRunner):
        def _infer(self, feed):
            return {"output1": feed["imgs"][:, 0, 0, :].T}  # a wrong shape: a bug, not the engine

    inputs = _narrow_inputs(tmp_path, tiny_lmdb, exported)
    spec = read_onnx_spec(exported["nano-ocr"])
    with (Recognizer(Buggy(fixed_models["nano-ocr"]), spec) as rec,
          pytest.raises(ValueError, match="expected a \\(T, N, C\\)")):
        run_evaluation(rec, inputs, warmup=0)


@pytest.mark.skipif(not IIIT5K.is_dir(), reason=f"IIIT5K lmdb not found at {IIIT5K}")
def test_iiit5k_nano_fixed_128_and_batched_equals_batch1(tmp_path, exported, fixed_models):
    reports, preds = {}, {}
    for layout in ("bucketed", "per-image"):
        inputs = tmp_path / layout
        assert parse_testdata.main(["--test_dir", str(IIIT5K), "--output_npy", str(inputs),
                                    "--model", str(exported["nano-ocr"]), "--width-policy",
                                    "fixed", "--layout", layout]) == 0
        preds[layout], reports[layout] = tmp_path / f"{layout}.csv", tmp_path / f"{layout}.json"
        assert postprocess.main(["--input_npy", str(inputs), "--onnx_path",
                                 str(fixed_models["nano-ocr"]), "--report", str(reports[layout]),
                                 "--predictions", str(preds[layout])]) == 0
    report = json.loads(reports["bucketed"].read_text())
    assert (report["samples"], report["scored"], report["failed"]) == (3000, 3000, 0)
    assert report["accuracy"] >= 0.776
    result = compare.compare(compare.read_predictions(preds["bucketed"]),
                             compare.read_predictions(preds["per-image"]))
    assert result["common"] == 3000 and result["differ"] == 0
    streamed = tmp_path / "stream.csv"
    assert postprocess.main(["--test-dir", str(IIIT5K), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--width-policy", "fixed",
                             "--predictions", str(streamed)]) == 0
    result = compare.compare(compare.read_predictions(preds["bucketed"]),
                             compare.read_predictions(streamed))
    assert result["common"] == 3000 and result["differ"] == 0


def test_tiny_lmdb_bucketed_equals_per_image(tmp_path, tiny_lmdb, exported, fixed_models):
    """Batched = batch-1 on a small lmdb of mixed formats, not only on the real data."""
    preds = {}
    for layout in ("bucketed", "per-image"):
        inputs = tmp_path / layout
        assert parse_testdata.main(["--test-dir", str(tiny_lmdb), "--output-npy", str(inputs),
                                    "--model", str(exported["nano-ocr"]), "--layout", layout,
                                    "--batch-size", "4", "--workers", "1"]) == 0
        preds[layout] = tmp_path / f"{layout}.csv"
        assert postprocess.main(["--input-npy", str(inputs), "--onnx-path",
                                 str(fixed_models["nano-ocr"]), "--predictions",
                                 str(preds[layout])]) == 0
    rows = {layout: list(csv.DictReader(path.open())) for layout, path in preds.items()}
    assert len(rows["bucketed"]) == 7
    assert [(r["index"], r["prediction"]) for r in rows["bucketed"]] == \
        [(r["index"], r["prediction"]) for r in rows["per-image"]]
    assert [float(r["confidence"]) for r in rows["bucketed"]] == \
        pytest.approx([float(r["confidence"]) for r in rows["per-image"]], abs=1e-4)


@pytest.mark.parametrize("lanes, expected", [
    ([], (available_cores(), 1)),  # the default: one one-thread lane per core
    (["--lanes", "1", "--threads", "2"], (1, 2)),
    (["--lanes", "3", "--threads", "1"], (3, 1)),
], ids=["default-lanes", "one-lane", "three-lanes"])
def test_one_process_path_equals_the_two_step_path(tmp_path, tiny_lmdb, tiny_inputs, fixed_models,
                                                   lanes, expected):
    """``--test-dir`` (decoding workers, streamed equal-width batches, engine lanes) = the
    two-step path with one lane."""
    reports, preds = {}, {}
    for name, source in (("two-step", ["--input-npy", str(tiny_inputs), "--lanes", "1"]),
                         ("one-process", ["--test-dir", str(tiny_lmdb), "--workers", "2",
                                          "--batch-size", "2", *lanes])):
        reports[name], preds[name] = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        assert postprocess.main([*source, "--onnx-path", str(fixed_models["nano-ocr"]),
                                 "--report", str(reports[name]),
                                 "--predictions", str(preds[name])]) == 0
    assert preds["one-process"].read_text() == preds["two-step"].read_text()
    two, one = (json.loads(reports[n].read_text()) for n in ("two-step", "one-process"))
    for key in ("samples", "scored", "failed", "accuracy", "one_minus_ned", "cer", "failures"):
        assert one[key] == two[key], key
    assert one["policy"]["layout"] == "stream" and one["failed"] == 3
    assert (one["executor"]["engine_lanes"], one["executor"]["threads_per_lane"]) == expected
    assert two["executor"]["engine_lanes"] == 1


@pytest.mark.skipif(not (IIIT5K.is_dir() and default_calibration_set().is_dir()),
                    reason="IIIT5K test or train-500 lmdb not found")
def test_int8_lstm_one_process_equals_two_step_on_iiit5k(tmp_path, fixed_models):
    """The dynamically quantised LSTM (run_e2e.sh's default) takes its activation scales from
    each batch; both flows build the same batches, so they still agree on every sample."""
    model = tmp_path / "int8_lstm.onnx"
    assert quantize.main([str(fixed_models["nano-ocr"]), str(model), "--lstm", "int8",
                          "--samples", "200"]) == 0
    inputs, two, one = tmp_path / "inputs", tmp_path / "two.csv", tmp_path / "one.csv"
    assert parse_testdata.main(["--test-dir", str(IIIT5K), "--output-npy", str(inputs),
                                "--model", str(model)]) == 0
    assert postprocess.main(["--input-npy", str(inputs), "--onnx-path", str(model),
                             "--predictions", str(two)]) == 0
    report = tmp_path / "one.json"
    assert postprocess.main(["--test-dir", str(IIIT5K), "--onnx-path", str(model),
                             "--predictions", str(one), "--report", str(report)]) == 0
    result = compare.compare(compare.read_predictions(two), compare.read_predictions(one))
    assert result["common"] == 3000 and result["differ"] == 0
    assert json.loads(report.read_text())["accuracy"] >= 0.785


def test_lanes_options_are_checked(tiny_lmdb, fixed_models, nano_weights, capsys):
    base = ["--test-dir", str(tiny_lmdb)]
    assert postprocess.main([*base, "--onnx-path", str(fixed_models["nano-ocr"]),
                             "--lanes", "0"]) == 1
    assert "--lanes must be >= 1" in capsys.readouterr().err
    assert postprocess.main([*base, "--onnx-path", str(fixed_models["nano-ocr"]), "--lanes", "2",
                             "--executor", "ray"]) == 1
    assert "goes with the local executor" in capsys.readouterr().err
    assert postprocess.main([*base, "--pth", str(nano_weights), "--arch", "nano-ocr",
                             "--lanes", "2"]) == 1
    assert "the torch backend runs one batch at a time" in capsys.readouterr().err


def test_one_process_path_refuses_a_label_file(tmp_path, tiny_lmdb, fixed_models, capsys):
    assert postprocess.main(["--test-dir", str(tiny_lmdb), "--onnx-path",
                             str(fixed_models["nano-ocr"]), "--label",
                             str(tmp_path / "l.txt")]) == 1
    assert "--label goes with --input-npy" in capsys.readouterr().err


def test_compare_exit_status_gates_on_differences(tmp_path, capsys):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("index,prediction\n1,cat\n2,dog\n")
    second.write_text("index,prediction\n1,cat\n2,dot\n")
    assert compare.main([str(first), str(first)]) == 0
    assert compare.main([str(first), str(second)]) == 1
    out = capsys.readouterr().out
    assert f"first ({first}) vs second ({second})" in out and "2: 'dog' vs 'dot'" in out
    second.write_text("index,prediction\n1,cat\n")
    assert compare.main([str(first), str(second)]) == 1  # a sample missing from one file


def test_width_options_with_input_npy_are_refused(tiny_inputs, fixed_models, capsys):
    """Inputs already preprocessed cannot change width: say so instead of ignoring the flag."""
    for option in (["--max-width", "160"], ["--tall-crops", "turn"]):
        assert postprocess.main(["--input-npy", str(tiny_inputs), "--onnx-path",
                                 str(fixed_models["nano-ocr"]), *option]) == 1
        assert "width options and --tall-crops go with --test-dir" in capsys.readouterr().err


@pytest.mark.parametrize("second", ["--onnx-path", "--om_path", "--pth", "--model"])
def test_two_models_are_refused_rather_than_the_last_one_used(tiny_lmdb, fixed_models, capsys,
                                                              second):
    with pytest.raises(SystemExit) as exited:
        postprocess.main(["--test-dir", str(tiny_lmdb), "--model", str(fixed_models["nano-ocr"]),
                          second, "other.onnx"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"one model only: {second} other.onnx after" in err
