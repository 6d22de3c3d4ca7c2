"""Time the whole path from the lmdb to scored predictions, five ways, in one run.

1. reference: what the ModelZoo postprocess does, on ONNX Runtime: one image at a time,
   decoded and resized to the fixed training width, batch-1 inference, decode, score.
2. torch-eager: what nano-ocr's ``read_batch`` does: PIL decode, grey, resize, one eager
   PyTorch forward per image, CTC decode.
3. toolchain default: ``python -m eval.postprocess --test-dir`` on the int8 copy
   (``convert.quantize --lstm int8``, as ``scripts/run_e2e.sh`` builds it) of the rewritten
   ONNX model: one process, decoding threads, streamed equal-width batches.
4. toolchain two-step: ``preprocess.parse_testdata`` then ``eval.postprocess --input-npy``
   (the ModelZoo flow) on the same int8 model.
5. toolchain, fp32 LSTM: the one-process path on the int8 copy whose LSTM stays fp32
   (``convert.quantize``'s default; batch-invariant, what a service with request batching needs).
6. toolchain fp32: the one-process path on the fp32 rewritten model, to show what int8 adds.
7. the accurate path: the one-process path on PP-OCRv6's recogniser, fp32 as fetched and its
   int8 copy (``convert.quantize`` with the model's recipe, calibrated on --calibration),
   with each one's engine time (the sum of its engine calls over its lanes); ``--no-ppocr``
   leaves them out.

Every path runs in a fresh child process of its own, so each one's peak memory is its own
(``VmHWM`` of the child), with its imports done before the clock starts.
Each is timed from loading its model to the last scored sample (loading and warm-up
included), on the same machine, in the same run, scored with the same protocol.
Building the models (export, rewrite, quantisation with its calibration) is a one-off step
outside the timings, like ATC on the NPU; its time is printed separately. Speed-ups are
per-image time ratios: reference / row and torch-eager / row.

Example (docs/results/README.md's table):
    python -m bench.e2e
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.memory import peak_rss_mib
from eval.metrics import recognition_metrics
from infer import open_model
from infer.onnxruntime_runner import available_cores
from pipeline import Recognition, Recognizer
from preprocess.image import decode_label
from preprocess.lmdb_reader import (
    count_samples,
    default_calibration_set,
    default_test_set,
    open_lmdb,
    read_sample,
)


def _per_image(
    data: Path, recognizer: Recognizer, limit: int | None
) -> tuple[list[str], list[str]]:
    """Recognise each sample alone (batch 1), as the ModelZoo postprocess and nano-ocr do."""
    env = open_lmdb(data)
    count = min(count_samples(env, data), limit or 1 << 30)
    predictions, labels = [], []
    with env.begin() as txn:
        for index in range(1, count + 1):
            raw = read_sample(txn, index)
            (result,) = recognizer([raw.image])
            predictions.append(result.text if isinstance(result, Recognition) else "")
            labels.append(decode_label(raw.label))
    env.close()
    return predictions, labels


def _batch_one(model: Path, limit: int | None, data: Path, **options) -> dict:
    """Open ``model``, warm it up, and recognise every sample alone at the fixed training width."""
    start = time.perf_counter()
    runner, spec = open_model(model, **options)
    spec = spec.replace(width_policy="fixed")
    with Recognizer(runner, spec, batch_size=1) as recognizer:
        recognizer.forward(np.zeros(spec.input_shape(1, spec.width), np.float32))
        preds, labels = _per_image(data, recognizer, limit)
    return _row(preds, labels, time.perf_counter() - start)


def reference(data: Path, onnx_model: Path, limit: int | None) -> dict:
    """Path 1: batch-1 ONNX Runtime at the fixed width."""
    return _batch_one(onnx_model, limit, data)


def torch_eager(data: Path, weights: Path, limit: int | None) -> dict:
    """Path 2: eager PyTorch, one forward per image, as nano-ocr's read_batch."""
    return _batch_one(weights, limit, data, arch="nano-ocr")


def one_process(data: Path, onnx_model: Path, workdir: Path) -> dict:
    """Paths 3 and 5: ``eval.postprocess --test-dir`` with its defaults (the CLI's ``main``)."""
    from eval import postprocess

    report = Path(tempfile.mkdtemp(dir=workdir, prefix="one-process-")) / "report.json"
    start = time.perf_counter()
    if postprocess.main(["--test-dir", str(data), "--onnx-path", str(onnx_model),
                         "--report", str(report)]):
        raise SystemExit("postprocess failed")
    seconds = time.perf_counter() - start
    result = json.loads(report.read_text())
    return {"seconds": seconds, "samples": result["scored"], "accuracy": result["accuracy"],
            "correct": result["correct"], "engine_seconds": result["engine_seconds_sum"]}


def toolchain(data: Path, onnx_model: Path, workdir: Path, extra: Sequence[str] = ()) -> dict:
    """Path 4: the project's two CLIs with their defaults (``extra``: parse_testdata options)."""
    from eval import postprocess
    from preprocess import parse_testdata

    run = Path(tempfile.mkdtemp(dir=workdir, prefix="two-step-"))  # a fresh one per repeat
    inputs, report = run / "inputs", run / "report.json"
    start = time.perf_counter()
    if parse_testdata.main(
        ["--test-dir", str(data), "--output-npy", str(inputs), "--model", str(onnx_model), *extra]
    ):
        raise SystemExit("parse_testdata failed")
    if postprocess.main(
        ["--input-npy", str(inputs), "--onnx-path", str(onnx_model), "--report", str(report)]
    ):
        raise SystemExit("postprocess failed")
    seconds = time.perf_counter() - start
    result = json.loads(report.read_text())
    return {
        "seconds": seconds,
        "samples": result["scored"],
        "accuracy": result["accuracy"],
        "correct": result["correct"],
        "policy": result["policy"],
    }


def _row(predictions: list[str], labels: list[str], seconds: float) -> dict:
    metrics = recognition_metrics(predictions, labels)
    return {
        "seconds": seconds,
        "samples": metrics["samples"],
        "accuracy": metrics["accuracy"],
        "correct": metrics["correct"],
    }


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument(
        "--data", type=Path, default=default_test_set(), help="lmdb test set ($IIIT5K_LMDB)"
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=default_calibration_set(),
        help="lmdb for int8 calibration ($IIIT5K_CALIB_LMDB)",
    )
    parser.add_argument("--limit", type=int, help="only the first N samples (paths 1 and 2)")
    parser.add_argument("--no-ppocr", dest="ppocr", action="store_false",
                        help="leave out PP-OCRv6's recogniser (fp32 and int8)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the five paths this many times, interleaved, and report each "
                             "path's median (for a machine whose speed drifts)")
    return parser


def _steal_ticks() -> tuple[int, int]:
    """(CPU ticks stolen by the hypervisor, all ticks) so far, from ``/proc/stat``'s
    ``cpu`` line (``steal`` is its 8th field; proc(5)); (0, 0) where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0, 0
    ticks = [int(f) for f in fields[:8]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def build_models(workdir: Path, calibration: Path) -> tuple[Path, Path, Path, Path, float]:
    """Fetch the nano-ocr weights, export, rewrite and quantise them (untimed in the table).

    Returns:
        (weights, fp32 rewritten model, int8 model with an int8 LSTM, int8 model with an
        fp32 LSTM, seconds the build took).
    """
    from convert import fix, pth2onnx, quantize
    from models.weights import fetch

    weights = fetch("nano-ocr")
    start = time.perf_counter()
    exported, fixed = workdir / "nano.onnx", workdir / "nano_fixed.onnx"
    int8, int8_fp32_lstm = workdir / "nano_int8.onnx", workdir / "nano_int8_fp32_lstm.onnx"
    if (
        pth2onnx.main([str(weights), str(exported), "--arch", "nano-ocr"])
        or fix.main([str(exported), str(fixed)])
        or quantize.main([str(fixed), str(int8), "--calibration", str(calibration),
                          "--lstm", "int8"])
        or quantize.main([str(fixed), str(int8_fp32_lstm), "--calibration", str(calibration)])
    ):
        raise SystemExit("model build failed")
    return weights, fixed, int8, int8_fp32_lstm, time.perf_counter() - start


def build_ppocr_models(workdir: Path, calibration: Path) -> tuple[Path, Path, float]:
    """Fetch PP-OCRv6's recogniser and quantise it with its recipe (untimed in the table).

    Returns:
        (fp32 model, int8 model, seconds the quantisation took).
    """
    from convert import quantize
    from models.weights import fetch

    fp32 = fetch("ppocr-v6-rec")
    int8 = workdir / "ppocr_v6_rec_int8.onnx"
    start = time.perf_counter()
    if quantize.main([str(fp32), str(int8), "--calibration", str(calibration)]):
        raise SystemExit("PP-OCRv6 int8 build failed")
    return fp32, int8, time.perf_counter() - start


_PATHS = {"reference": reference, "torch": torch_eager, "one-process": one_process,
          "two-step": toolchain}


def _in_child(path: str, args: tuple) -> dict:
    """Run one path in this (fresh) process after its imports; add its peak memory."""
    if path == "torch":
        import torch  # noqa: F401 - imported before the clock starts
    else:
        from eval import postprocess  # noqa: F401 - imported before the clock starts
        from preprocess import parse_testdata  # noqa: F401

    result = _PATHS[path](*args)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def _child_main(path: str, args: tuple, results) -> None:
    results.put(_in_child(path, args))


def _measure(path: str, *args) -> dict:
    """Run a path in a fresh (spawned, non-daemonic: it may start decoding workers) process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_child_main, args=(path, args, results))
    child.start()
    while True:  # a child that dies before answering must not leave us waiting forever
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise SystemExit(
                    f"bench path {path} failed with exit code {child.exitcode}") from None
    child.join()
    if child.exitcode:
        raise SystemExit(f"bench path {path} failed with exit code {child.exitcode}")
    return result


def _median_run(runs: list[dict]) -> dict:
    """The run with the median seconds (the lower middle one for an even count), with the
    fastest and slowest seconds and the largest peak memory of all runs."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    middle = dict(ordered[(len(ordered) - 1) // 2])
    middle["range"] = (ordered[0]["seconds"], ordered[-1]["seconds"])
    middle["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return middle


def _run(args) -> int:
    if args.repeats < 1:
        raise ToolchainError(f"--repeats must be >= 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights, model, int8, int8_fp32_lstm, build_seconds = build_models(workdir,
                                                                           args.calibration)
        paths = {
            "reference (ModelZoo-style, ORT batch 1, fixed width)":
                ("reference", args.data, model, args.limit),
            "torch eager per image (nano-ocr read_batch)":
                ("torch", args.data, weights, args.limit),
            "toolchain default: one process, int8": ("one-process", args.data, int8, workdir),
            "toolchain two-step (parse_testdata + postprocess), int8":
                ("two-step", args.data, int8, workdir),
            "toolchain one process, int8 with the LSTM in fp32":
                ("one-process", args.data, int8_fp32_lstm, workdir),
            "toolchain one process, fp32": ("one-process", args.data, model, workdir),
        }
        if args.ppocr:
            v6, v6_int8, v6_seconds = build_ppocr_models(workdir, args.calibration)
            build_seconds += v6_seconds
            paths["PP-OCRv6 rec, one process, fp32"] = ("one-process", args.data, v6, workdir)
            paths["PP-OCRv6 rec, one process, int8"] = ("one-process", args.data, v6_int8,
                                                        workdir)
        runs: dict[str, list[dict]] = {label: [] for label in paths}
        stolen_before = _steal_ticks()
        for _ in range(args.repeats):  # interleaved, so a slow spell hits every path alike
            for label, path in paths.items():
                runs[label].append(_measure(*path))
        stolen_after = _steal_ticks()
    results = {label: _median_run(r) for label, r in runs.items()}
    for result in results.values():
        result.pop("policy", None)
    total = stolen_after[1] - stolen_before[1]
    steal = (stolen_after[0] - stolen_before[0]) / total if total else 0.0
    repeats = (f"median of {args.repeats} interleaved runs of each path"
               if args.repeats > 1 else "one run of each path")
    print(
        f"\n{args.data.name}, nano-ocr weights, {available_cores()} cores, `python -m "
        f"bench.e2e{f' --repeats {args.repeats}' if args.repeats > 1 else ''}` ({repeats}); "
        f"CPU time stolen by the hypervisor during the timings: {steal:.0%}; model build "
        f"(export, rewrite, int8 calibration on {args.calibration.name}) "
        f"{build_seconds:.1f} s, not in the table\n"
    )
    per_image = {label: r["seconds"] / r["samples"] for label, r in results.items()}
    ref_label, torch_label = list(results)[:2]
    print("| path | samples | seconds | fastest-slowest s | images/s | word accuracy "
          "| speed-up over reference | speed-up over torch eager "
          "| engine s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        low, high = r["range"]
        engine = f"{r['engine_seconds']:.2f}" if "engine_seconds" in r else "-"
        print(
            f"| {label} | {r['samples']} | {r['seconds']:.2f} | {low:.2f}-{high:.2f} "
            f"| {r['samples'] / r['seconds']:.0f} "
            f"| {r['accuracy']:.4f} | {per_image[ref_label] / per_image[label]:.2f}x "
            f"| {per_image[torch_label] / per_image[label]:.2f}x "
            f"| {engine} | {r['peak_rss_mib']:.0f} |"
        )
    v6, v6_int8 = (results.get(f"PP-OCRv6 rec, one process, {p}") for p in ("fp32", "int8"))
    if v6 and v6_int8:
        nano = results["toolchain default: one process, int8"]
        engine = v6["engine_seconds"] / v6_int8["engine_seconds"]
        speed = per_image["PP-OCRv6 rec, one process, fp32"] / \
            per_image["PP-OCRv6 rec, one process, int8"]
        against_nano = per_image["toolchain default: one process, int8"] / \
            per_image["PP-OCRv6 rec, one process, int8"]
        print(f"\nPP-OCRv6 rec int8 against fp32: engine time 1/{engine:.2f}, images/s "
              f"x{speed:.2f}, word accuracy {v6_int8['accuracy']:.4f} against "
              f"{v6['accuracy']:.4f}; its images/s are x{against_nano:.2f} nano-ocr's int8 "
              f"default path ({nano['accuracy']:.4f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
