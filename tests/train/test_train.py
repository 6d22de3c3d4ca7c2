"""Training: rendered data, the training loop's outputs, resume, bad input, and DDP."""

from __future__ import annotations

import csv
import importlib.util
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import DESCRIPTION_KEY, read_description, read_state_dict
from models.registry import spec_for_arch
from models.weights import fetch
from tests.conftest import encode, word_image, write_lmdb
from tests.train.conftest import WORDS, train_one_and_two_processes
from train import __main__ as train_cli
from train.synth import MIN_CONTRAST, Font, find_fonts, read_corpus, render, synthesise
from train.trainer import load_words, log_probs, needed_frames, plan_epoch


def _lmdb_items(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items


def test_synth_is_deterministic_by_seed(tmp_path, synth_words):
    again = tmp_path / "again"
    synthesise(again, WORDS, find_fonts([]), 80, seed=0, progress=False)
    other = tmp_path / "other"
    synthesise(other, WORDS, find_fonts([]), 80, seed=1, progress=False)
    first = _lmdb_items(synth_words)
    assert first == _lmdb_items(again)
    assert first[b"image-000000001"] != _lmdb_items(other)[b"image-000000001"]
    assert first[b"num-samples"] == b"80" and b"synthetic" in first
    assert {first[b"label-%09d" % i].decode() for i in range(1, 81)} <= set(WORDS)


def test_rendered_text_stands_out_in_grey():
    """The recognisers see grey (Pillow's "L"); a clean rendering's text and background differ
    by MIN_CONTRAST levels there, for every draw (per-channel colour offsets once cancelled
    out in grey and left 7 % of samples invisible)."""
    font = Font.load(find_fonts([])[0], 32)
    spans = []
    for index in range(1, 301):
        data = render("Hotel", font, np.random.default_rng([0, index]), augment=False)
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.int16)
        spans.append(int(grey.max()) - int(grey.min()))
    assert min(spans) >= MIN_CONTRAST - 1
    assert max(spans) > 150  # and not all the same low contrast


def test_synth_counts_what_no_font_draws_and_refuses_existing_output(tmp_path, capsys):
    from train import synth

    corpus = tmp_path / "mixed.txt"
    corpus.write_text("hello\n春眠不觉晓\nworld\n", encoding="utf-8")
    out = tmp_path / "out"
    assert synth.main([str(out), "--corpus", str(corpus), "--samples", "6"]) == 0
    assert "1 entries skipped" in capsys.readouterr().out
    labels = {v.decode() for k, v in _lmdb_items(out).items() if k.startswith(b"label-")}
    assert labels <= {"hello", "world"}
    assert synth.main([str(out), "--corpus", str(corpus)]) != 0
    assert "exists" in capsys.readouterr().err
    assert synth.main(["/proc/no_lmdb_here", "--corpus", str(corpus)]) != 0
    assert "cannot be written" in capsys.readouterr().err
    assert synth.main([str(tmp_path / "x"), "--corpus", str(corpus), "--font",
                       str(tmp_path / "none.ttf")]) != 0
    assert "no such font file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_load_words_skips_and_counts_what_cannot_train(tmp_path):
    spec = spec_for_arch("nano-ocr")
    path = write_lmdb(tmp_path / "odd", {
        1: (encode(word_image("good", 100, 32, "RGB")), b"good"),
        2: (encode(word_image("bad", 100, 32, "RGB")), "caf\u00e9!".encode()),  # outside
        3: (b"not an image", b"junk"),
        4: (encode(word_image("x", 40, 32, "RGB")), b"a" * 60),  # more than its frames
    }, num_samples=5)
    words = load_words(path, spec, spec.charset)
    assert words.texts == ["good"]
    assert words.skipped["characters outside the charset"] == 1
    assert words.skipped["label longer than the frames of its width"] == 1
    assert words.skipped["no image or label key"] == 1
    assert sum(v for k, v in words.skipped.items() if k.startswith("undecodable")) == 1
    assert needed_frames([1, 1, 2]) == 4


def test_unknown_characters_can_be_dropped_from_labels_instead(tmp_path):
    spec = spec_for_arch("nano-ocr")
    path = write_lmdb(tmp_path / "symbols", {
        1: (encode(word_image("good", 100, 32, "RGB")), b"good"),
        2: (encode(word_image("don't", 100, 32, "RGB")), b"DON'T!"),
        3: (encode(word_image("cafe", 100, 32, "RGB")), "caf\u00e9".encode()),
        4: (encode(word_image("%&", 100, 32, "RGB")), b"%&"),  # nothing left
    }, num_samples=4)
    skipping = load_words(path, spec, spec.charset)
    assert skipping.texts == ["good"] and skipping.trimmed == 0
    assert skipping.skipped["characters outside the charset"] == 3
    dropping = load_words(path, spec, spec.charset, unknown="drop")
    assert dropping.texts == ["good", "DONT", "caf"] and dropping.trimmed == 2
    assert dropping.targets[1] == spec.charset.encode("DONT")
    assert dict(dropping.skipped) == {
        "nothing left after dropping characters outside the charset": 1}
    with pytest.raises(ValueError, match="'skip' or 'drop'"):
        load_words(path, spec, spec.charset, unknown="keep")


def test_plan_epoch_is_seeded_and_equal_width():
    spec = spec_for_arch("nano-ocr")

    from train.trainer import WordSet

    def words(widths: list[int]) -> WordSet:
        return WordSet(Path("fake"), pixels=[np.zeros((32, w), np.uint8) for w in widths],
                       texts=["x"] * len(widths), targets=[[1]] * len(widths))

    sets = [words([96] * 10 + [120] * 7), words([96] * 5)]
    a = plan_epoch(sets, [1.0, 1.0], 4, seed=3, epoch=0)
    assert a == plan_epoch(sets, [1.0, 1.0], 4, seed=3, epoch=0)
    assert a != plan_epoch(sets, [1.0, 1.0], 4, seed=3, epoch=1)
    for batch in a:
        assert len({sets[s].pixels[i].shape[1] for s, i in batch}) == 1 and len(batch) >= 2
    drawn = [s for batch in a for s, _ in batch]
    assert abs(drawn.count(0) - drawn.count(1)) <= 2  # equal ratios, equal draws
    del spec


def _train(*args) -> int:
    return train_cli.main([str(a) for a in args])


def test_fine_tune_writes_described_outputs_and_resumes(tmp_path, synth_words, capsys):
    out = tmp_path / "run"
    assert _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 1,
                  "--batch-size", 8, "--max-steps", 2, "--workers", 1) == 0
    assert {p.name for p in out.iterdir()} >= {"model.pth", "last.pth", "log.csv", "curves.png"}
    spec = read_description(out / "model.pth")
    assert spec is not None and spec.arch == "nano-ocr"
    assert spec.tall_crops == "turn"  # --tall-crops' default, carried to every later tool
    state = torch.load(out / "model.pth", weights_only=True)
    assert state[DESCRIPTION_KEY]["alphabet"] == spec.alphabet
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and 0.0 <= float(rows[0]["val_accuracy"]) <= 1.0
    # The toolchain takes it with no other flag.
    from convert import pth2onnx
    from models.backends import describe

    assert pth2onnx.main([str(out / "model.pth"), str(tmp_path / "m.onnx")]) == 0
    assert describe(tmp_path / "m.onnx").tall_crops == "turn"
    # A folder with a run in it is refused without --resume; --resume goes on.
    assert _train("--train", synth_words, "--out", out) != 0
    assert "--resume" in capsys.readouterr().err
    resume = ("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 2,
              "--batch-size", 8, "--max-steps", 4, "--workers", 1, "--resume")
    # A resumed run keeps its own tall-crop policy: asking for another is refused, not ignored.
    assert _train(*resume, "--tall-crops", "keep") != 0
    assert "reads tall crops 'turn'" in capsys.readouterr().err
    assert _train(*resume, "--tall-crops", "turn") == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "2"), ("2", "4")]
    assert read_description(out / "model.pth").tall_crops == "turn"


def test_a_run_resumed_with_other_validation_sets_logs_every_epoch(tmp_path, synth_words):
    """The log's columns are the union over the run: an epoch validated on fewer --val sets
    than the epochs before it leaves their columns empty, and last.pth is written."""
    second = tmp_path / "second_val"
    shutil.copytree(synth_words, second)
    out = tmp_path / "run"
    common = ("--init", "nano-ocr", "--train", synth_words, "--out", out, "--batch-size", 8,
              "--workers", 1, "--val", synth_words)
    assert _train(*common, "--val", second, "--epochs", 1, "--max-steps", 1) == 0
    assert _train(*common, "--epochs", 2, "--max-steps", 2, "--resume") == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["val_accuracy_second_val"] != "" and rows[1]["val_accuracy_second_val"] == ""
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_a_resumed_run_counts_the_minutes_it_already_spent(tmp_path, synth_words, caplog):
    """--max-minutes budgets the whole run: last.pth keeps the seconds spent, and a resumed
    run starts its clock there, so a budget already spent trains no further step (a fresh
    clock, as before, trained on) and a larger one goes on counting from the saved time."""
    out = tmp_path / "run"
    common = ("--init", "nano-ocr", "--train", synth_words, "--out", out, "--batch-size", 8,
              "--workers", 1, "--epochs", 1000, "--val-split", 0, "--resume")
    assert _train(*common[:-1], "--max-steps", 2, "--max-minutes", 10) == 0
    first = torch.load(out / "last.pth", weights_only=True)
    assert first["step"] == 2 and first["elapsed"] > 0
    assert _train(*common, "--max-steps", 4, "--max-minutes", first["elapsed"] / 60 / 2) == 0
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 2  # nothing trained
    assert "give a larger --max-minutes to train on" in caplog.text
    assert _train(*common, "--max-steps", 4, "--max-minutes", 10) == 0
    second = torch.load(out / "last.pth", weights_only=True)
    assert second["step"] == 4 and second["elapsed"] > first["elapsed"]


def test_ema_keeps_the_moving_average_and_resumes_with_it(tmp_path, synth_words, capsys,
                                                         caplog):
    common = ("--init", "nano-ocr", "--train", synth_words, "--epochs", 1, "--batch-size", 8,
              "--workers", 1, "--ema", 0.25)
    assert _train(*common, "--out", tmp_path / "one", "--max-steps", 1) == 0
    assert _train(*common, "--out", tmp_path / "two", "--max-steps", 2) == 0
    after_one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    kept = torch.load(tmp_path / "two" / "model.pth", weights_only=True)["state_dict"]
    # The first update copies the weights; the second: avg = 0.25 * avg + 0.75 * weights.
    moved = 0
    for name, weights in two["state_dict"].items():
        if weights.is_floating_point():
            expected = 0.25 * after_one[name] + 0.75 * weights
            torch.testing.assert_close(kept[name], expected, rtol=0, atol=1e-6)
            moved += not torch.equal(kept[name], weights)
    assert moved > 0  # the kept model is the average, not the last weights
    assert two["ema_decay"] == 0.25 and int(two["ema"]["n_averaged"]) == 2
    # --resume needs --ema again, and goes on averaging.
    resume = ("--init", "nano-ocr", "--train", synth_words, "--out", tmp_path / "two",
              "--epochs", 2, "--batch-size", 8, "--workers", 1, "--max-steps", 3, "--resume")
    caplog.clear()
    assert _train(*resume) != 0
    assert "give --ema 0.25 again" in capsys.readouterr().err
    assert not any(r.getMessage().startswith("start:") for r in caplog.records)  # no data read
    assert _train(*resume, "--ema", 0.25) == 0
    assert int(torch.load(tmp_path / "two" / "last.pth", weights_only=True)
               ["ema"]["n_averaged"]) == 3


def test_a_nan_loss_stops_with_a_clear_error(tmp_path, synth_words, capsys):
    out = tmp_path / "nan"
    code = _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 1,
                  "--batch-size", 8, "--lr", "1e30", "--workers", 1)
    err = capsys.readouterr().err
    assert code != 0 and "the loss became nan" in err and "Traceback" not in err
    assert not (out / "model.pth").exists()  # nothing after the last good epoch (none)


def test_two_gloo_processes_equal_one_process(tmp_path, synth_words):
    """torchrun with 2 processes (gloo) and 1 process, same global batch: same parameters,
    with augmentation on (each global row's draw is seeded by its row, not its rank) and
    tall crops to orient (rank 0 chooses, every rank trains on its choice)."""
    turned, _ = _turned_words(synth_words, tmp_path / "turned", 8)
    _, two = train_one_and_two_processes(
        ["--init", "nano-ocr", "--train", str(synth_words), "--train", f"{turned}:0.5",
         "--epochs", "2", "--batch-size", "8", "--workers", "1", "--val-split", "0.25",
         "--epoch-samples", "24", "--augment", "--geometric", "--orient-tall-crops"], tmp_path)
    assert "(2 epochs)" in two.stdout and "8 tall crops" in two.stderr  # oriented twice
    a = torch.load(tmp_path / "one" / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "model.pth", weights_only=True)["state_dict"]
    start = read_state_dict(fetch("nano-ocr"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"largest parameter difference, 2 processes vs 1: {worst:.2e}")
    assert worst <= 1e-5, worst
    moved = max(float((a[k].float() - start[k].float()).abs().max()) for k in a if k in start)
    assert moved > 1e-4  # the updates did change the model
    # the logged training loss is the whole batch's on rank 0 too, not rank 0's half
    logged = [[float(row["train_loss"]) for row in
               csv.DictReader((tmp_path / run / "log.csv").read_text().splitlines())]
              for run in ("one", "two")]
    assert len(logged[0]) == len(logged[1]) == 2
    assert logged[1] == pytest.approx(logged[0], rel=1e-5), logged


def test_bad_arguments_are_one_line(tmp_path, synth_words, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    monkeypatch.setattr(train_cli, "native_bfloat16", lambda: False)  # a CPU without bfloat16
    for args, message in [
        (["--train", synth_words, "--out", tmp_path / "a", "--amp"],
         "--amp on the CPU needs native bfloat16 (AVX512-BF16 or AMX)"),
        (["--train", f"{synth_words}:0", "--out", tmp_path / "b"], "ratio must be > 0"),
        (["--train", synth_words, "--out", tmp_path / "c", "--resume"], "does not exist"),
        (["--train", synth_words, "--out", tmp_path / "d", "--init", "none"], "needs --arch"),
        (["--train", synth_words, "--out", tmp_path / "e", "--charset", "nofile"], "no such"),
        (["--train", synth_words, "--out", tmp_path / "f", "--charset", f"corpus:{latin1}"],
         "not UTF-8 text"),
        (["--train", synth_words, "--out", "/proc/no_run_here"], "cannot be written"),
        (["--train", tmp_path / "no_lmdb", "--out", tmp_path / "g"], "not an lmdb"),
        (["--train", synth_words, "--out", tmp_path / "h", "--no-augment", "--geometric"],
         "--geometric goes with --augment"),
        (["--train", synth_words, "--out", tmp_path / "i", "--ema", "1"],
         "--ema 1.0: the decay must be between 0 and 1"),
        (["--train", synth_words, "--out", tmp_path / "k", "--val-split", "-1"],
         "--val-split -1.0: the share held out must be between 0 (none) and 0.5"),
        (["--train", synth_words, "--out", tmp_path / "l", "--val-split", "1.5"],
         "--val-split 1.5: the share held out must be between 0 (none) and 0.5"),
        *([(["--train", synth_words, "--out", tmp_path / "j", "--device", "cuda"],
            "--device cuda: this PyTorch sees no CUDA device")]
          if not torch.cuda.is_available() else []),
        *([(["--train", synth_words, "--out", tmp_path / "m", "--device", "npu"],
            "--device npu needs torch_npu (Ascend Extension for PyTorch")]
          if importlib.util.find_spec("torch_npu") is None else []),
        (["--train", synth_words, "--out", tmp_path / "n", "--device", "tpu"],
         "device 'tpu' is unknown; use cpu, cuda, cuda:N, npu or npu:N"),
    ]:
        assert _train(*args) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    # A run that stopped before its first checkpoint leaves no empty folder behind; a folder
    # that was there before stays.
    assert not any((tmp_path / name).exists() for name in "abcdefghijklmn")
    (tmp_path / "mine").mkdir()
    assert _train("--train", tmp_path / "no_lmdb", "--out", tmp_path / "mine") != 0
    assert (tmp_path / "mine").is_dir()


def test_each_rank_trains_on_the_device_of_its_local_rank():
    device = train_cli.training_device
    assert device("cpu") == ("cpu", "gloo") and device("cpu", 1, 2) == ("cpu", "gloo")
    assert device("cuda") == ("cuda", "nccl") and device("cuda:1") == ("cuda:1", "nccl")
    assert device("cuda", 1, 2) == ("cuda:1", "nccl")  # torchrun: LOCAL_RANK's GPU
    assert device("npu") == ("npu:0", "hccl") and device("npu:3") == ("npu:3", "hccl")
    assert device("npu", 3, 4) == ("npu:3", "hccl")
    assert device("2") == ("npu:2", "hccl")  # the spelling every tool takes (infer.device)
    for text, size, message in [("npu:0", 2, "2 processes would share one device"),
                                ("cuda:0", 2, "2 processes would share one device"),
                                ("cpu:0", 1, "the CPU takes no index"),
                                ("2", 2, "2 processes would share one device"),
                                ("gpu", 1, "device 'gpu' is unknown; use cpu, cuda")]:
        with pytest.raises(train_cli.ToolchainError, match=message):
            device(text, 0, size)


def test_an_npu_rank_imports_torch_npu_and_sets_its_device_first(monkeypatch):
    """Our side of torch_npu's contract, with a TEST DOUBLE standing in for torch_npu (not
    installed here, and it needs CANN and an Ascend NPU): ``--device npu`` imports it only
    then, and sets the rank's device (``torch_npu.npu.set_device``) before the process group
    starts, as Ascend's DDP examples do; the backend is hccl."""
    import types

    calls = []
    double = types.ModuleType("torch_npu", "TEST DOUBLE for Ascend's torch_npu")
    double.npu = types.SimpleNamespace(set_device=calls.append)
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no process group to start here
    assert train_cli._setup_distributed("npu") == (6, 1, "npu:2")
    assert calls == ["npu:2"]


def test_from_scratch_small_crnn_folds_case_and_exports(tmp_path, synth_words):
    """crnn-small (0-9a-z) from scratch: labels are lower-cased, the run stops on its time
    budget, and the result goes through export and the ATC rewrite with no flags."""
    spec = spec_for_arch("crnn-small")
    words = load_words(synth_words, spec, spec.charset)
    assert set(words.texts) <= {w.lower() for w in WORDS} and len(words) == 80
    out = tmp_path / "scratch"
    assert _train("--init", "none", "--arch", "crnn-small", "--train", synth_words, "--out", out,
                  "--epochs", 1000, "--batch-size", 8, "--lr", "1e-3", "--max-minutes", "0.05",
                  "--workers", 1) == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert 1 <= len(rows) < 1000  # stopped by the time budget, with a validated epoch
    assert read_description(out / "model.pth").arch == "crnn-small"
    assert _train("--init", "none", "--arch", "crnn-small", "--train", synth_words, "--out",
                  tmp_path / "keep", "--max-steps", 1, "--batch-size", 8, "--workers", 1,
                  "--tall-crops", "keep") == 0
    assert read_description(tmp_path / "keep" / "model.pth").tall_crops == "keep"
    from convert import fix, pth2onnx

    assert pth2onnx.main([str(out / "model.pth"), str(tmp_path / "s.onnx")]) == 0
    assert fix.main([str(tmp_path / "s.onnx"), str(tmp_path / "s_fixed.onnx")]) == 0


def test_native_bfloat16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    for flags, native in (("fpu avx2 avx512f avx512_vnni", False),
                          ("fpu avx512f avx512_bf16 avx512_vnni", True),
                          ("fpu amx_bf16 amx_tile amx_int8", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t:\n")
        assert train_cli.native_bfloat16(cpuinfo) is native, flags
    assert train_cli.native_bfloat16(tmp_path / "missing") is False


def test_amp_on_the_cpu_runs_the_forward_in_bfloat16(tmp_path, synth_words, monkeypatch):
    """``--amp`` on the CPU: the forward runs under bfloat16 autocast (checked inside it), the
    loss and the kept weights stay float32. (Where the CPU has no native bfloat16 the check is
    bypassed here and oneDNN emulates it: slower, same contract.)"""
    monkeypatch.setattr(train_cli, "native_bfloat16", lambda: True)
    seen = []

    def spy(model, images, spec):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        scores = log_probs(model, images, spec)
        assert scores.dtype == torch.float32  # the CTC loss is computed in float32
        return scores

    monkeypatch.setattr(train_cli, "log_probs", spy)
    out = tmp_path / "amp"
    assert _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 1,
                  "--batch-size", 8, "--max-steps", 2, "--workers", 1, "--amp") == 0
    assert seen == [(True, torch.bfloat16)] * 2
    state = torch.load(out / "model.pth", weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    start = read_state_dict(fetch("nano-ocr"))
    assert not torch.equal(state["rnn.weight_ih_l0"], start["rnn.weight_ih_l0"])  # it trained


def test_freeze_convolutions_keeps_the_first_layers(tmp_path, synth_words):
    out = tmp_path / "frozen"
    assert _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 1,
                  "--batch-size", 8, "--max-steps", 2, "--workers", 1, "--freeze-convs", 2,
                  "--lr", "1e-3") == 0
    after = torch.load(out / "model.pth", weights_only=True)["state_dict"]
    start = read_state_dict(fetch("nano-ocr"))
    assert torch.equal(after["cnn.0.weight"], start["cnn.0.weight"])  # conv 1: fixed
    assert torch.equal(after["cnn.3.weight"], start["cnn.3.weight"])  # conv 2: fixed
    assert not torch.equal(after["cnn.6.weight"], start["cnn.6.weight"])  # conv 3: trained


def test_validation_of_a_chinese_charset_is_exact_match():
    """The field's protocol keeps only 0-9a-z, so it would score any Chinese prediction as
    right; Chinese labels are validated by exact match (eval.metrics.protocol_for)."""
    import numpy as np

    from models.charset import Charset
    from train.trainer import WordSet, initial_model, validate

    model, spec, _ = initial_model(None, "crnn-small", Charset("春眠不觉晓处闻啼鸟", 0))
    words = WordSet(Path("zh"), [np.full((32, 96), 255, np.uint8)] * 2, [[1], [2]],
                    ["春眠", "不觉晓"])
    metrics = validate(model, words, spec)
    assert metrics["word_accuracy"] == metrics["accuracy"] == 0.0  # not 1.0: nothing erased
    assert metrics["accuracy_case_sensitive"] == 0.0 and metrics["one_minus_ned"] < 1.0


def test_charset_from_a_corpus_is_its_characters_in_order(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("春眠不觉晓\t12\n处处闻啼鸟\t7\n", encoding="utf-8")
    charset = train_cli.read_charset(f"corpus:{corpus}")
    assert charset.characters == "春眠不觉晓处闻啼鸟" and charset.blank == 0
    assert train_cli.read_charset("model") is None


def test_photometric_augmentation_keeps_width_and_is_seeded():
    import numpy as np

    from train.trainer import photometric

    pixels = (np.arange(32 * 90) % 256).astype(np.uint8).reshape(32, 90)
    first = [photometric(pixels, np.random.default_rng([0, k])) for k in range(40)]
    again = [photometric(pixels, np.random.default_rng([0, k])) for k in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(a.shape == pixels.shape and a.dtype == np.uint8 for a in first)
    changed = sum(not np.array_equal(a, pixels) for a in first)
    assert 20 <= changed < 40  # most samples change, some are left as they are
    colour = np.stack([pixels] * 3, -1)
    assert photometric(colour, np.random.default_rng(1)).shape == colour.shape


def test_tilt_slants_and_rotates_about_the_centre_and_keeps_the_shape():
    import numpy as np

    from train.trainer import geometric, tilt

    bar = np.full((32, 64), 200, np.uint8)
    bar[:, 30:34] = 20  # a dark upright stroke on a light ground

    def stroke_x(pixels, row):
        return float(np.mean(np.flatnonzero(pixels[row] < 110)))

    slanted = tilt(bar, 0, 0.2)
    assert slanted.shape == bar.shape and slanted.dtype == np.uint8
    # the top moves right and the bottom left by 0.2 x their distance from the centre row
    assert stroke_x(slanted, 0) - stroke_x(bar, 0) == pytest.approx(0.2 * 15.5, abs=0.6)
    assert stroke_x(slanted, 31) - stroke_x(bar, 31) == pytest.approx(-0.2 * 15.5, abs=0.6)
    assert slanted[0, 0] == slanted[0, 63] == 200  # uncovered corners: the border's colour
    # 10 degrees counter-clockwise: a horizontal stroke rises to the right
    line = np.full((32, 64), 200, np.uint8)
    line[15:17, :] = 20
    turned = tilt(line, 10, 0)
    rows = [float(np.mean(np.flatnonzero(turned[:, x] < 110))) for x in (12, 52)]
    assert rows[0] - rows[1] == pytest.approx(40 * np.tan(np.deg2rad(10)), abs=0.8)
    assert np.array_equal(tilt(bar, 0, 0), bar)
    colour = np.stack([bar] * 3, -1)
    assert tilt(colour, 3, 0.1).shape == colour.shape
    # seeded, and about half of the draws leave a sample upright
    drawn = [geometric(bar, np.random.default_rng([0, k])) for k in range(40)]
    again = [geometric(bar, np.random.default_rng([0, k])) for k in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again))
    assert 20 <= sum(not np.array_equal(a, bar) for a in drawn) < 40


def test_augmented_training_runs_and_differs(tmp_path, synth_words):
    plain, augmented, tilted = tmp_path / "plain", tmp_path / "aug", tmp_path / "tilted"
    default = tmp_path / "default"
    for out, extra in ((plain, ["--no-augment"]), (augmented, ["--augment"]),
                       (tilted, ["--augment", "--geometric"]), (default, [])):
        assert _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--epochs", 1,
                      "--batch-size", 8, "--max-steps", 2, "--workers", 1, "--lr", "1e-3",
                      *extra) == 0
    one, two, three, four = (torch.load(p / "model.pth", weights_only=True)["state_dict"]
                             for p in (plain, augmented, tilted, default))
    assert torch.equal(two["fc.weight"], four["fc.weight"])  # fine-tuning augments by default
    assert not torch.equal(one["fc.weight"], two["fc.weight"])  # other pixels, other gradients
    assert not torch.equal(two["fc.weight"], three["fc.weight"])


def test_equal_word_accuracies_keep_the_epoch_with_the_higher_1ned(tmp_path, monkeypatch):
    """A flat validation accuracy (a small split, or a charset still on CTC's plateau) keeps
    the epoch that reads closest, not the first; a higher accuracy still wins outright."""
    from train.trainer import Run

    spec = spec_for_arch("crnn-small")
    model = torch.nn.Linear(2, 2)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)
    scripted = iter([(0.0, 0.02), (0.0, 0.05), (0.0, 0.04), (0.5, 0.60), (0.5, 0.55)])

    def validate(kept, words, spec):
        accuracy, one_minus_ned = next(scripted)
        return {"word_accuracy": accuracy, "one_minus_ned": one_minus_ned}

    monkeypatch.setattr(train_cli, "validate", validate)
    run = Run(tmp_path)
    kept_epochs = []
    for epoch in range(1, 6):
        train_cli._end_epoch(run, model, None, spec, [object()], optimiser, schedule, epoch,
                             epoch, [1.0], 8, 1.0, 1, time.perf_counter())
        kept_epochs.append(torch.load(tmp_path / "model.pth", weights_only=True)["epoch"])
    assert kept_epochs == [1, 2, 2, 4, 4]
    assert (run.best, run.best_one_minus_ned) == (0.5, 0.60)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [float(r["val_one_minus_ned"]) for r in rows] == [0.02, 0.05, 0.04, 0.60, 0.55]
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (last["best"], last["best_one_minus_ned"]) == (0.5, 0.60)


def test_resuming_a_run_from_before_the_1ned_column_keeps_its_log_aligned(tmp_path, synth_words):
    """A last.pth written before log.csv had val_one_minus_ned: resumed twice, the old rows
    keep their values under their own columns (the new column left empty)."""
    out = tmp_path / "run"
    common = ("--init", "nano-ocr", "--train", synth_words, "--out", out, "--batch-size", 8,
              "--workers", 1)
    assert _train(*common, "--epochs", 1, "--max-steps", 1) == 0
    state = torch.load(out / "last.pth", weights_only=True)
    column = state["log_keys"].index("val_one_minus_ned")
    del state["best_one_minus_ned"], state["log_keys"][column]
    state["log_rows"] = [row[:column] + row[column + 1:] for row in state["log_rows"]]
    torch.save(state, out / "last.pth")  # as the earlier code wrote it
    first_lr = state["log_rows"][0][state["log_keys"].index("lr")]
    assert _train(*common, "--epochs", 2, "--max-steps", 2, "--resume") == 0
    assert _train(*common, "--epochs", 3, "--max-steps", 3, "--resume") == 0
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["lr"]) == pytest.approx(first_lr) and rows[0]["val_one_minus_ned"] == ""
    assert all(0.0 <= float(r["val_one_minus_ned"]) <= 1.0 for r in rows[1:])


def test_a_validation_split_with_nothing_in_it_is_named(tmp_path, capsys, caplog):
    """10 samples hold no 20th index: the error names the split and the ways out; with
    --val-split 0 the run goes on, and says model.pth is the last epoch."""
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(WORDS), encoding="utf-8")
    synthesise(tmp_path / "tiny", read_corpus(corpus), find_fonts([]), 10, seed=0,
               progress=False)
    common = ("--init", "nano-ocr", "--train", tmp_path / "tiny", "--batch-size", 4,
              "--max-steps", 1, "--workers", 1)
    assert _train(*common, "--out", tmp_path / "a") == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'tiny'} (the validation split, every 20th index; give "
                   "--val LMDB, or --val-split 0 for none): no usable sample (empty)")
    assert not (tmp_path / "a").exists()
    assert _train(*common, "--out", tmp_path / "b", "--val-split", 0) == 0
    assert "no validation set, so model.pth is the last epoch" in capsys.readouterr().out
    (epoch,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1")]
    assert "no validation set," in epoch and "nan" not in epoch  # not 'validation accuracy nan'
    assert (tmp_path / "b" / "model.pth").is_file()


def test_validation_reads_tall_crops_as_the_description_says(tmp_path, synth_words, caplog):
    """With ``tall_crops="turn"`` the validation set keeps the turned readings of its tall
    crops and ``validate`` keeps the most confident, as ``eval.postprocess`` does."""
    from models.checkpoint import load_checkpoint
    from tests.eval.test_tall_crops import write_tall_lmdb
    from train.trainer import validate

    lmdb_path = write_tall_lmdb(tmp_path / "tall")
    spec = spec_for_arch("nano-ocr").replace(tall_crops="turn")
    model = load_checkpoint(fetch("nano-ocr"), spec)
    upright = load_words(lmdb_path, spec, spec.charset, unknown="drop")
    turned = load_words(lmdb_path, spec, spec.charset, unknown="drop", turns=True)
    assert upright.turned == {} and turned.texts == upright.texts
    assert all([t for t, _ in readings] == [1, -1] for readings in turned.turned.values())
    assert len(turned.turned) == 40 and len(turned) == 50  # every tall crop, none of the wide
    before = validate(model, upright, spec)["word_accuracy"]
    after = validate(model, turned, spec)["word_accuracy"]
    assert after >= before + 0.15  # 8 -> 20 of 50 words through eval.postprocess
    odd = load_words(lmdb_path, spec, spec.charset, keep=lambda i: i % 2 == 0, unknown="drop",
                     turns=True)  # a hold-out split keeps the turns of its own samples only
    assert len(odd) == 25 and set(odd.turned) == set(range(20))  # tall crops come first
    # The command line: --val reads the tall crops three ways, and says so at the start.
    assert _train("--init", "nano-ocr", "--train", synth_words, "--val", lmdb_path, "--out",
                  tmp_path / "run", "--max-steps", 1, "--batch-size", 8, "--workers", 1,
                  "--unknown-chars", "drop") == 0
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start:"))
    assert start.endswith("validation tall 50 (40 tall crops read three ways)"), start


def _turned_words(source: Path, path: Path, count: int = 24) -> tuple[Path, dict[int, int]]:
    """An lmdb of the first ``count`` wide renderings in ``source``, turned a quarter
    (counter-clockwise and clockwise in turn), so each is a tall crop; and index -> the
    quarter turn (``preprocess.image.turned``'s sign) that stands it upright again."""
    items = _lmdb_items(source)
    entries, upright = {}, {}
    index = 0
    while len(entries) < count:
        index += 1
        image = Image.open(io.BytesIO(items[b"image-%09d" % index]))
        if image.width < 2 * image.height:
            continue
        number = len(entries) + 1
        ccw = number % 2 == 1
        entries[number] = (encode(image.transpose(Image.Transpose.ROTATE_90 if ccw
                                                  else Image.Transpose.ROTATE_270)),
                           items[b"label-%09d" % index])
        upright[number] = -1 if ccw else 1
    return write_lmdb(path, entries, len(entries)), upright


def test_training_reads_tall_crops_in_the_orientation_of_lowest_loss(tmp_path, synth_words):
    """With ``tall_crops="turn"`` a training set keeps the turned readings of its tall crops
    and reads each in the orientation whose CTC loss for its label is lowest: rendered words
    turned a quarter either way are read turned back, not squeezed upright."""
    import torch.nn.functional as F

    from models.checkpoint import load_checkpoint
    from preprocess.batching import batch_inputs
    from train.trainer import make_batch, orient_tall_crops

    path, upright = _turned_words(synth_words, tmp_path / "turned")
    spec = spec_for_arch("nano-ocr").replace(tall_crops="turn")
    model = load_checkpoint(fetch("nano-ocr"), spec)
    words = load_words(path, spec, spec.charset, unknown="drop", turns=True)
    assert len(words.turned) == len(words) == 24 and words.orientation == {}
    chosen = orient_tall_crops(model, [words], spec)
    assert chosen.total() == 24
    right = sum(words.orientation.get(i, 0) == upright[i + 1] for i in range(len(words)))
    assert right >= 22, words.orientation  # the way back up, all but a hard one or two
    for i in range(len(words)):  # each choice has the lowest loss, one reading at a time
        losses = {}
        for turn, pixels in words.readings(i):
            ((_, images),) = batch_inputs([pixels], spec, 1)
            with torch.no_grad():
                scores = log_probs(model, torch.from_numpy(images), spec)
            losses[turn] = float(F.ctc_loss(scores, torch.tensor([words.targets[i]]),
                                            [scores.shape[0]], [len(words.targets[i])],
                                            blank=spec.blank, reduction="sum"))
        turn = words.orientation.get(i, 0)
        assert losses[turn] <= min(losses.values()) + 1e-3, (i, losses, turn)
    # Batches read the chosen reading: the turned pixels, not the upright ones.
    seen = 0
    for batch in plan_epoch([words], [1.0], 4, seed=0, epoch=0):
        images, _, _ = make_batch([words], batch, spec)
        ((_, expected),) = batch_inputs([words.reading(i) for _, i in batch], spec, len(batch))
        np.testing.assert_array_equal(images.numpy(), expected)
        for k, (_, i) in enumerate(batch):
            if words.orientation.get(i, 0):
                ((_, squeezed),) = batch_inputs([words.pixels[i]], spec, 1)
                assert not np.array_equal(images.numpy()[k], squeezed[0])
                seen += 1
    assert seen >= 12  # plan_epoch leaves out lone rows of a width
    # Without turns (tall_crops "keep"), nothing is turned.
    kept = load_words(path, spec.replace(tall_crops="keep"), spec.charset, unknown="drop",
                      turns=True)
    assert kept.turned == {} and orient_tall_crops(model, [kept], spec).total() == 0


def test_a_tall_crop_too_narrow_upright_for_its_label_trains_turned(tmp_path):
    """A crop whose label needs more CTC frames than its upright reading has was skipped;
    with turned readings it is kept and trains turned, where the frames are."""
    spec = spec_for_arch("nano-ocr").replace(tall_crops="turn")
    label = "abcdefghijklmnopqrstuvwxyzabcd"  # 30 characters; upright, 96 px give 25 frames
    tall = word_image(label, 640, 24).transpose(Image.Transpose.ROTATE_90)
    path = write_lmdb(tmp_path / "long", {1: (encode(tall), label.encode()),
                                          2: (encode(word_image("good", 100, 32)), b"good")}, 2)
    upright = load_words(path, spec, spec.charset, turns=False)
    assert upright.texts == ["good"]
    assert upright.skipped["label longer than the frames of its width"] == 1
    words = load_words(path, spec, spec.charset, turns=True)
    assert words.texts == [label, "good"] and words.orientation == {0: 1}
    assert needed_frames(words.targets[0]) <= spec.frames(words.reading(0).shape[1])
    assert needed_frames(words.targets[0]) > spec.frames(words.pixels[0].shape[1])


def test_the_training_command_orients_tall_crops_every_epoch_when_asked(
        tmp_path, synth_words, caplog, capsys, monkeypatch):
    path, _ = _turned_words(synth_words, tmp_path / "turned", 12)
    calls = []
    real = train_cli.orient_tall_crops
    monkeypatch.setattr(train_cli, "orient_tall_crops",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ("--init", "nano-ocr", "--train", synth_words, "--train", path, "--batch-size", 8,
              "--workers", 1, "--val-split", 0, "--epoch-samples", 16)
    assert _train(*common, "--out", tmp_path / "as-is", "--epochs", 1) == 0
    assert calls == [] and not any("tall crop" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert _train(*common, "--out", tmp_path / "run", "--epochs", 3, "--orient-tall-crops") == 0
    assert len(calls) == 3  # before the first epoch, and again before each later one
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start:"))
    assert "turned 12 (skipped {}; 12 tall crops, each trained in the orientation of its " \
           "lowest loss)" in start, start
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 3 and all(" of 12 tall crops trained turned" in e for e in epochs)
    assert _train(*common, "--out", tmp_path / "keep", "--tall-crops", "keep",
                  "--orient-tall-crops") != 0
    assert "--orient-tall-crops goes with tall crops read turned; this run reads them " \
           "'keep'" in capsys.readouterr().err
    assert not (tmp_path / "keep").exists()


def test_bad_learning_rates_and_a_resumed_lr_are_one_line_errors(tmp_path, synth_words, capsys):
    base = ("--init", "nano-ocr", "--train", synth_words, "--batch-size", 8, "--workers", 1,
            "--val-split", 0)
    for bad in ("nan", "inf", "0"):
        with pytest.raises(SystemExit):
            _train(*base, "--out", tmp_path / "bad", "--lr", bad)
        assert "must be a finite number > 0" in capsys.readouterr().err
    out = tmp_path / "run"
    assert _train(*base, "--out", out, "--epochs", 1, "--max-steps", 1) == 0
    capsys.readouterr()
    assert _train(*base, "--out", out, "--epochs", 2, "--resume", "--lr", "1e-3") == 1
    assert "leave out --lr" in capsys.readouterr().err
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


def test_a_loss_that_diverges_before_any_checkpoint_says_none_was_written(tmp_path,
                                                                          synth_words, capsys):
    out = tmp_path / "run"
    code = _train("--init", "nano-ocr", "--train", synth_words, "--out", out, "--batch-size", 8,
                  "--workers", 1, "--val-split", 0, "--lr", "1e30", "--epochs", 1,
                  "--max-steps", 6)
    err = capsys.readouterr().err
    assert code == 1 and "the loss became" in err and "no checkpoint was written yet" in err
    assert not (out / "last.pth").exists() and not (out / "log.csv").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_log_is_not_ahead(tmp_path,
                                                                                   synth_words):
    """A real write failure: the process's file size limit (RLIMIT_FSIZE, with SIGXFSZ
    ignored, so the write fails with EFBIG as on a full disk) is below a checkpoint's size."""
    import sys

    from common.cli import REPO_ROOT

    out = tmp_path / "run"
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
              "from train.__main__ import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "--init", "nano-ocr", "--train",
                           str(synth_words), "--out", str(out), "--batch-size", "8",
                           "--workers", "1", "--val-split", "0", "--epochs", "1",
                           "--max-steps", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("error: ") and ".pth: cannot be written" in last
    left = list(out.iterdir()) if out.exists() else []  # a fresh run's folder may go whole
    assert not [p.name for p in left if p.name in ("log.csv", "last.pth", "model.pth")
                or ".partial-" in p.name], last
