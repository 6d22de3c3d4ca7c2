"""Fine-tuning an ONNX CTC recogniser converted to PyTorch, through the whole toolchain."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnx
import pytest
import torch

from models.backends import describe
from models.checkpoint import GRAPH_KEY, read_description
from models.onnx_module import read_graph
from tests.conftest import tiny_ctc_spec
from tests.train.conftest import train_one_and_two_processes
from train import __main__ as train_cli


def _train(*args) -> int:
    return train_cli.main([str(a) for a in args])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_a_converted_recogniser_fine_tunes_and_goes_through_the_toolchain(
        tmp_path, tiny_ctc_onnx, synth_words, capsys, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO")
    assert _train("--init", tiny_ctc_onnx, "--train", synth_words, "--out", out, "--epochs", 1,
                  "--batch-size", 8, "--max-steps", 3, "--workers", 1, "--lr", 1e-3,
                  "--freeze-convs", 2, "--val-split", 0.25) == 0
    assert "matches ONNX Runtime on 4 training crops" in caplog.text
    assert "converted from ONNX (3 convolutions" in caplog.text
    contents = torch.load(out / "model.pth", weights_only=True)
    assert isinstance(contents[GRAPH_KEY], bytes)
    spec = read_description(out / "model.pth")
    assert (spec.arch, spec.output_kind, spec.alphabet) == ("tiny-ctc", "logits",
                                                            tiny_ctc_spec().alphabet)
    # --freeze-convs counts the graph's Conv nodes in order; the rest trained
    start = read_graph(tiny_ctc_onnx).state_dict()
    tuned = _state(out / "last.pth")
    for key in ("layers.conv1.weight", "layers.conv2.weight"):
        assert torch.equal(tuned[key], start[key]), key
    for key in ("layers.conv3.weight", "weights.head_w", "weights.ln_gamma"):
        assert not torch.equal(tuned[key], start[key]), key
    assert torch.equal(tuned["layers.bn1.running_mean"], start["layers.bn1.running_mean"])

    # Export: the shipped graph with the trained weights, probabilities out, no extra flag.
    from convert import fix, pth2onnx, quantize

    exported = tmp_path / "ft.onnx"
    assert pth2onnx.main([str(out / "model.pth"), str(exported)]) == 0
    assert "the original graph with the trained weights" in capsys.readouterr().out
    written = onnx.load(str(exported))
    original = onnx.load(str(tiny_ctc_onnx))
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    assert describe(exported).output_kind == "probabilities"
    assert describe(exported).arch == "tiny-ctc"
    # the ATC rewrite check, int8 and evaluation take it as they take the shipped model
    fixed = tmp_path / "ft_fixed.onnx"
    assert fix.main([str(exported), str(fixed)]) == 0
    from convert import atc

    assert atc.main(["--model", str(fixed), "--output", str(tmp_path / "om" / "ft"),
                     "--soc-version", "Ascend310P3", "--dry-run"]) == 0
    assert "--input_shape=x:1~16,3,16,32~160" in capsys.readouterr().out  # its description's
    int8 = tmp_path / "ft_int8.onnx"
    assert quantize.main([str(fixed), str(int8), "--calibration", str(synth_words),
                          "--samples", "40", "--min-agreement", "0"]) == 0
    assert describe(int8).arch == "tiny-ctc"
    from eval import postprocess

    for model in (exported, int8):
        report = tmp_path / f"{model.stem}.json"
        assert postprocess.main(["--test-dir", str(synth_words), "--onnx-path", str(model),
                                 "--report", str(report)]) == 0
        assert json.loads(report.read_text())["samples"] == 80
    # the checkpoint itself runs in the PyTorch backend with no --arch
    report = tmp_path / "pth.json"
    assert postprocess.main(["--test-dir", str(synth_words), "--pth", str(out / "model.pth"),
                             "--report", str(report)]) == 0
    assert json.loads(report.read_text())["samples"] == 80

    # Resume goes on from last.pth, rebuilt from its own graph.
    assert _train("--init", tiny_ctc_onnx, "--train", synth_words, "--out", out, "--epochs", 2,
                  "--batch-size", 8, "--max-steps", 6, "--workers", 1, "--val-split", 0.25,
                  "--freeze-convs", 2, "--resume") == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("2", "6")]

    # WiSE-FT interpolates with the ONNX file it started from.
    from train import wise

    assert wise.main([str(out / "last.pth"), str(tmp_path / "wise.pth"), "--alpha", "0.5"]) == 0
    mixed, tuned = _state(tmp_path / "wise.pth"), _state(out / "last.pth")
    for key in ("weights.head_w", "layers.conv3.bias"):
        assert torch.allclose(mixed[key], (start[key] + tuned[key]) / 2, atol=1e-6)
    assert pth2onnx.main([str(tmp_path / "wise.pth"), str(tmp_path / "wise.onnx")]) == 0


def test_a_converted_recogniser_keeps_its_charset_and_its_opset(tmp_path, tiny_ctc_onnx,
                                                                synth_words, capsys):
    charset = tmp_path / "chars.txt"
    charset.write_text("a\nb\n", encoding="utf-8")
    assert _train("--init", tiny_ctc_onnx, "--train", synth_words, "--out", tmp_path / "c",
                  "--charset", str(charset), "--max-steps", 1) != 0
    error = capsys.readouterr().err
    assert "keeps its own charset of 65 characters" in error and "Traceback" not in error
    out = tmp_path / "run"
    assert _train("--init", tiny_ctc_onnx, "--train", synth_words, "--out", out,
                  "--batch-size", 8, "--max-steps", 1, "--workers", 1) == 0
    from convert import pth2onnx

    assert pth2onnx.main([str(out / "model.pth"), str(tmp_path / "x.onnx"), "--opset",
                          "13"]) != 0
    assert "leave out --opset" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    # a detector is not a recogniser
    from models.weights import fetch

    assert _train("--init", fetch("ppocr-v4-det"), "--train", synth_words, "--out",
                  tmp_path / "d", "--max-steps", 1) != 0
    assert "its task is text-detection (ppocr-v4-det)" in capsys.readouterr().err
    # an ONNX file without this toolchain's description is named
    bare = onnx.load(str(tiny_ctc_onnx))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert _train("--init", tmp_path / "bare.onnx", "--train", synth_words, "--out",
                  tmp_path / "b", "--max-steps", 1) != 0
    assert "bare.onnx" in capsys.readouterr().err


def test_two_gloo_processes_train_a_converted_model_as_one_process(tmp_path, tiny_ctc_onnx,
                                                                    synth_words):
    """DistributedDataParallel over a converted graph: 2 processes (gloo) and 1 process with
    the same global batch reach the same parameters."""
    train_one_and_two_processes(
        ["--init", str(tiny_ctc_onnx), "--train", str(synth_words), "--epochs", "2",
         "--batch-size", "8", "--workers", "1", "--val-split", "0.25", "--epoch-samples", "24",
         "--augment", "--lr", "1e-3"], tmp_path)
    a, b = _state(tmp_path / "one" / "model.pth"), _state(tmp_path / "two" / "model.pth")
    start = read_graph(tiny_ctc_onnx).state_dict()
    assert a.keys() == b.keys() == start.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    moved = max(float((a[k].float() - start[k].float()).abs().max()) for k in a)
    assert moved > 1e-4  # the updates did change the model


def test_the_service_serves_a_fine_tuned_converted_model_as_offline(tmp_path, tiny_ctc_onnx,
                                                                    synth_words):
    """The checkpoint and its export, each served over HTTP, answer as the offline reading
    loop does."""
    import httpx

    from infer import open_model
    from pipeline import Recognizer
    from preprocess.lmdb_reader import open_lmdb, read_sample
    from serve.process import ServerProcess

    out = tmp_path / "run"
    assert _train("--init", tiny_ctc_onnx, "--train", synth_words, "--out", out,
                  "--batch-size", 8, "--max-steps", 2, "--workers", 1, "--lr", 1e-3) == 0
    from convert import pth2onnx

    exported = tmp_path / "ft.onnx"
    assert pth2onnx.main([str(out / "model.pth"), str(exported)]) == 0
    env = open_lmdb(synth_words)
    with env.begin() as txn:
        images = [read_sample(txn, index).image for index in range(1, 9)]
    env.close()
    for model in (out / "model.pth", exported):
        runner, spec = open_model(model)
        with Recognizer(runner, spec, batch_size=1) as recognizer:
            expected = [recognizer([image])[0] for image in images]
        with ServerProcess(["--model", str(model), "--name", "ft"]) as running, \
                httpx.Client(base_url=running.url, timeout=30) as client:
            served = [client.post("/service", content=image).json() for image in images]
        assert [s["text"] for s in served] == [e.text for e in expected], model
        assert [s["confidence"] for s in served] == pytest.approx(
            [e.confidence for e in expected], rel=1e-4)
