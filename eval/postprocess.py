"""Run model inputs through a backend, decode with CTC, and report accuracy and end-to-end time.

Inputs: ``--test-dir LMDB`` reads the lmdb in this process (decoding in worker
threads, equal-width batches, inference and CTC decoding overlapping; no .npy files), or
``--input-npy DIR`` takes what ``preprocess.parse_testdata`` wrote (the ModelZoo two-step
flow). Both give the same predictions.

Engine lanes (``--lanes``, ``pipeline.Recognizer(lanes=N)``): N batches in the engine at once,
each on its own thread with ``--threads`` intra-op threads. An .onnx on the CPU gets one
one-thread lane per core by default; ais_bench and PyTorch run one batch at a time.

Models: ``--model X`` with the backend chosen by the file's suffix from the backend table
(``models.backends``): ``.onnx`` (ONNX Runtime, ``--device cpu`` by default or ``cuda``),
``.om`` (ais_bench on an Ascend NPU, ``--device npu:N``; ranges or gears from the sidecar JSON
that convert.atc writes), or ``.pth`` with ``--arch`` (PyTorch, the reference path).
``--onnx-path``, ``--om-path`` and ``--pth`` are the same option, and the ModelZoo spellings
``--input_npy``, ``--onnx_path`` and ``--om_path`` are accepted too. Labels come from the
input folder's manifest.json; ``--label`` takes a
ModelZoo label.txt.

Scale-out (``--test-dir`` only): ``--executor ray --workers N [--address auto|HOST:6379]``
recognises index ranges of the lmdb on a pool of Ray actors, each holding the model
(``eval.ray_executor``; Ray is optional: requirements-ray.txt); ``--om-path X.om --device
0,1,2,3`` runs one process per NPU on this host (``eval.devices``). Both merge per-sample
results and score them exactly as one process does; a worker that dies fails only its
block's samples, each recorded with the reason.

Scoring: word accuracy under the field's protocol (lower-case both sides, keep only
0-9a-z; a set of mostly non-Latin labels, Chinese say, is scored by exact match instead),
case-sensitive word accuracy, 1 - normalised edit distance (ICDAR 2019), CER, and
accuracy by resized width, all over the scored samples (the report's ``accuracy_basis``;
``accuracy_over_all_samples`` counts failed samples as wrong, and the summary line gives it
whenever a sample failed). A model whose description reads tall crops turned
(``tall_crops="turn"``, or ``--tall-crops turn``) reads each crop at least 1.5 times as high
as wide three ways (as it is, turned 90 degrees counter-clockwise and clockwise) and keeps
the most confident reading; the report counts the crops kept turned. Every sample of the
source set is either scored or listed in
``failed`` with the stage and reason. ``e2e_seconds`` runs from the first input read to the
last decoded sample, warm-up excluded. The ModelZoo guide's equivalent is
``python3 postpossess_CRNN_pytorch.py --input_npy input_npy --label label.txt --om_path X.om``.

Examples:
    python -m eval.postprocess --test-dir ../shared/data/IIIT5K_3000 --onnx-path nano_int8.onnx
    python -m eval.postprocess --test-dir ../shared/data/IIIT5K_3000 --onnx-path nano_int8.onnx \\
        --executor ray --workers 2
    python -m eval.postprocess --input-npy work/inputs --onnx-path nano_fixed.onnx \\
        --report report.json --predictions predictions.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file, json_content, write_texts
from eval.blocks import DEFAULT_BLOCK_SIZE, BlockJob, plan_blocks, survey_test_set
from eval.devices import parse_device_list, run_on_devices
from eval.evaluate import EvalRun, run_batches, run_evaluation
from eval.inputs import InputSet, load_input_set
from eval.metrics import (
    EXACT_PROTOCOL,
    PROTOCOLS,
    accuracy_by_width,
    is_correct,
    protocol_for,
    recognition_metrics,
)
from eval.ray_executor import run_on_ray
from infer import describe, open_model
from infer.device import DEVICE_SPELLINGS, parse_device
from infer.onnxruntime_runner import available_cores
from infer.open import backend_of
from models.ctc import DECODERS
from models.registry import ARCHS, GATE_ORDERS
from models.spec import ModelSpec
from pipeline import Recognizer
from pipeline.recognizer import engine_lanes as recognizer_lanes
from preprocess.parse_testdata import (
    add_width_arguments,
    failed_count,
    preprocessing_policy,
    width_overrides,
)
from preprocess.stream import Stream, missing_range, stream_batches

#: Samples per batch of the one-process path (``--test-dir``); see docs/results/README.md.
DEFAULT_BATCH_SIZE = 16

log = logging.getLogger(__name__)

_CHECKED_FIELDS = ("alphabet", "blank", "height", "channels", "channel_order", "mean", "std")


def check_compatible(model_spec: ModelSpec, input_model: dict | None, source: str) -> None:
    """Raise when the inputs were preprocessed for a different model than the one evaluated."""
    if not input_model:
        return
    different = [f for f in _CHECKED_FIELDS if input_model.get(f) != getattr(model_spec, f)]
    if different:
        raise ToolchainError(
            f"the inputs were preprocessed for {input_model.get('arch')!r} but {source} is "
            f"{model_spec.arch!r}; they differ in {', '.join(different)}: rerun parse_testdata "
            "with --model pointing at this model")


def machine_facts() -> dict[str, object]:
    """Where a report was made: cores available to this process, platform, processor."""
    return {"cores": available_cores(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def make_report(run: EvalRun, inputs: InputSet, spec: ModelSpec, backend: str, model: str,
                decoder: str) -> dict[str, object]:
    """The report.json content (see the module docstring for the fields)."""
    start = time.perf_counter()
    preds = run.predictions
    protocol = protocol_for([p.label for p in preds])
    metrics = recognition_metrics([p.prediction for p in preds], [p.label for p in preds],
                                  protocol)
    correct = [is_correct(p.prediction, p.label, protocol) for p in preds]
    by_width = accuracy_by_width([p.width for p in preds], correct)
    score_seconds = time.perf_counter() - start
    failed = sorted(inputs.failed + run.failed, key=lambda f: f["index"])
    latencies_ms = np.array(run.batch_latencies) * 1000.0
    return {
        "samples": inputs.num_samples,
        "scored": len(preds),
        "failed": failed_count(failed),
        "accuracy": metrics["accuracy"],
        "correct": metrics["correct"],
        "accuracy_case_sensitive": metrics["accuracy_case_sensitive"],
        "one_minus_ned": metrics["one_minus_ned"],
        "cer": metrics["cer"],
        "accuracy_over_all_samples": (metrics["correct"] / inputs.num_samples
                                      if inputs.num_samples else 0.0),
        "accuracy_basis": ACCURACY_BASIS,
        "protocol": PROTOCOLS[protocol],
        "decoder": decoder,
        "backend": backend,
        "model": model,
        "arch": spec.arch,
        "policy": inputs.policy,
        "tall_crops": {"mode": spec.tall_crops, "ratio": spec.tall_ratio,
                       "kept_turned": sum(1 for p in preds if p.turn)},
        "data": {"path": inputs.source or str(inputs.folder), "num_samples": inputs.num_samples,
                 "synthetic": inputs.synthetic},
        "e2e_seconds": run.e2e_seconds,
        "images_per_second": len(preds) / run.e2e_seconds if run.e2e_seconds else 0.0,
        "stages": {**run.stages, "score": score_seconds},
        "latency_ms": {
            "batches": len(run.batch_latencies),
            "p50": float(np.percentile(latencies_ms, 50)) if len(latencies_ms) else 0.0,
            "p99": float(np.percentile(latencies_ms, 99)) if len(latencies_ms) else 0.0,
        },
        "engine_seconds_sum": run.engine_seconds_sum,
        "accuracy_by_width": by_width,
        "failures": failed,
        "machine": machine_facts(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


#: What ``accuracy`` and the other scores are over (the report's ``accuracy_basis``).
ACCURACY_BASIS = ("scored samples: failed samples are left out; accuracy_over_all_samples "
                  "counts them as wrong")

#: Header of predictions.csv.
PREDICTION_COLUMNS = ["index", "label", "prediction", "confidence", "correct", "width"]
#: Keys every report.json of this tool has.
_REPORT_KEYS = {"protocol", "backend", "scored", "failures"}


def _written_by_us(path: Path) -> bool:
    """Whether an existing file is a report.json or predictions.csv this tool wrote."""
    if path.suffix == ".json":
        report = json_content(path)
        return isinstance(report, dict) and report.keys() >= _REPORT_KEYS
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), None) == PREDICTION_COLUMNS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def check_outputs(args) -> None:
    """Refuse report and predictions paths that cannot be written, or that hold a file this
    tool did not write (it replaces only its own earlier outputs).

    Raises:
        ToolchainError: one line naming the path.
    """
    for flag, path in (("--report", args.report), ("--predictions", args.predictions)):
        if not path:
            continue
        check_output_file(path, flag, ours=_written_by_us, tool="eval.postprocess")


def predictions_csv(run: EvalRun) -> str:
    """predictions.csv: index, label, prediction, confidence, correct (under the protocol the
    report names, :func:`eval.metrics.protocol_for`), width."""
    protocol = protocol_for([p.label for p in run.predictions])
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(PREDICTION_COLUMNS)
    for p in run.predictions:
        writer.writerow([p.index, p.label, p.prediction, f"{p.confidence:.4f}",
                         int(is_correct(p.prediction, p.label, protocol)), p.width])
    return handle.getvalue()


def summary_line(report: dict) -> str:
    """One line a person can paste into an issue."""
    return (
        f"{report['backend']} {Path(report['model']).name} on {Path(report['data']['path']).name}"
        f"{' (SYNTHETIC data)' if report['data']['synthetic'] else ''}: word accuracy "
        f"{report['accuracy']:.4f} ({report['correct']}/{report['scored']} scored, "
        f"{'exact match' if report['protocol'] == EXACT_PROTOCOL else 'lower-case 0-9a-z'}), "
        f"case-sensitive {report['accuracy_case_sensitive']:.4f}, 1-NED "
        f"{report['one_minus_ned']:.4f}; {report['samples']} samples, {report['scored']} scored, "
        f"{report['failed']} failed{_over_all_note(report)}{_turned_note(report)}; "
        f"E2E {report['e2e_seconds']:.2f} s, "
        f"{report['images_per_second']:.0f} img/s "
        f"(engine sum {report['engine_seconds_sum']:.2f} s{_lanes_note(report)}, "
        f"{report['machine']['cores']} cores)"
    )


def _over_all_note(report: dict) -> str:
    """With failed samples, the accuracy over all of them (failed ones counted as wrong)."""
    return (f" (word accuracy over all samples {report['accuracy_over_all_samples']:.4f})"
            if report["failed"] else "")


def _turned_note(report: dict) -> str:
    tall = report.get("tall_crops", {})
    return f", {tall['kept_turned']} read turned" if tall.get("mode") == "turn" else ""


def _lanes_note(report: dict) -> str:
    lanes = report.get("executor", {}).get("engine_lanes", 1)
    return f" over {lanes} engine lanes" if lanes > 1 else ""


class _OneModel(argparse.Action):
    """``--model`` and its aliases name one model: a second is an error, not the last wins."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = getattr(namespace, self.dest, None)
        if given is not None:
            parser.error(f"one model only: {option_string} {value} after {given} (--model and "
                         "its aliases --onnx-path, --om-path, --pth are one option)")
        setattr(namespace, self.dest, value)


def _parser():
    parser = make_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--test-dir", "--test_dir", dest="test_dir", type=Path,
                        help="lmdb test set, read, decoded and batched in this process (one step)")
    source.add_argument("--input-npy", "--input_npy", dest="input_npy", type=Path,
                        help="parse_testdata output (the two-step ModelZoo flow)")
    parser.add_argument(
        "--model", "--onnx-path", "--onnx_path", "--om-path", "--om_path", "--pth",
        dest="model", type=Path, required=True, action=_OneModel,
        help="the model file (one); its suffix chooses the backend (models.backends): .onnx (ONNX "
             "Runtime), .om (ais_bench, with its sidecar JSON), .pth/.pt (PyTorch; needs --arch "
             "unless it carries its description, as train's do)")
    parser.add_argument("--arch", choices=list(ARCHS), help="architecture of --pth")
    parser.add_argument("--rnn-layout", default="auto", help="recurrent layout of --pth")
    parser.add_argument(
        "--gate-order", default="ifgo", choices=GATE_ORDERS, help="stored LSTM gate order of --pth"
    )
    parser.add_argument(
        "--device", help=f"{DEVICE_SPELLINGS} (default: npu:0 for --om-path, else cpu)"
    )
    parser.add_argument(
        "--sidecar", type=Path, help="sidecar JSON of --om-path (default: beside it)"
    )
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (default: cores)"
    )
    parser.add_argument(
        "--lanes", type=int,
        help="engine calls in flight at once, each with --threads intra-op threads (default: "
             "one lane per core with 1 thread each for an .onnx on the CPU when --threads is "
             "not given, else 1)")
    parser.add_argument(
        "--label", type=Path, help="ModelZoo label.txt instead of the manifest's labels"
    )
    parser.add_argument("--decoder", default="greedy", choices=DECODERS)
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of the first batch")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="samples per batch with --test-dir (equal widths)")
    add_width_arguments(parser)
    parser.add_argument("--workers", type=int,
                        help="with --test-dir: decoding threads (default: cores; 1: in the main "
                             "thread); with --executor ray: Ray actors, each with the model "
                             "(default 2)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: this process (or one per NPU with --device 0,1,...); "
                             "ray: an actor pool on Ray Data (needs --test-dir)")
    parser.add_argument("--address", help="Ray cluster to join (auto on a cluster node, or "
                                          "HOST:6379); default: a local Ray with --workers CPUs")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="lmdb indices per block with --executor ray or a device list")
    parser.add_argument("--report", type=Path, help="write report.json here")
    parser.add_argument("--predictions", type=Path, help="write predictions.csv here")
    return parser


def _stream_inputs(args, spec: ModelSpec) -> tuple[InputSet, Stream, ModelSpec]:
    """The one-process source: the lmdb streamed into equal-width batches, and the
    description with the width options (and ``--tall-crops``) applied."""
    spec = spec.replace(**_overrides(args))
    stream = stream_batches(args.test_dir, spec, args.batch_size, args.workers)
    policy = preprocessing_policy(spec, "stream", args.batch_size, 0)
    inputs = InputSet(args.test_dir, [], [], spec.to_dict(), policy, stream.count,
                      str(args.test_dir.resolve()), stream.synthetic)
    return inputs, stream, spec


def _overrides(args) -> dict[str, object]:
    return {k: v for k, v in width_overrides(args).items() if v is not None}


def _check_scale_out(args) -> str | None:
    """Which executor runs the evaluation: None (this process), "ray" or "devices".

    Raises:
        ToolchainError: options that do not go together (one line).
    """
    devices = bool(args.device and "," in args.device)
    if args.executor == "local" and not devices:
        if args.address:
            raise ToolchainError("--address goes with --executor ray")
        return None
    if not args.test_dir:
        raise ToolchainError("--executor ray and device lists read the lmdb: give --test-dir "
                             "(--input-npy is the two-step flow, in one process)")
    if devices and backend_of(args.model).name != "ais_bench":
        raise ToolchainError(f"--device {args.device}: a device list runs one process per NPU "
                             "and needs --om-path (ONNX Runtime and PyTorch run on one device)")
    if devices:
        parse_device_list(args.device)  # its spelling, before any model or data is read
    if devices and args.executor == "ray":
        raise ToolchainError("--executor ray places its actors on the cluster's NPUs itself; "
                             "leave out the device list (or use --executor local)")
    if args.address and args.executor != "ray":
        raise ToolchainError("--address goes with --executor ray")
    named = parse_device(args.device) if args.executor == "ray" and args.device else None
    if named is not None and named.index is not None:
        raise ToolchainError(f"--device {args.device}: Ray gives each actor its own device; "
                             f"give {named.kind} without an index")
    return "ray" if args.executor == "ray" else "devices"


def _evaluate_in_blocks(args, executor: str, model_path: Path, options: dict):
    """The scale-out run: blocks of the lmdb on Ray actors or NPU processes, merged.

    Returns:
        ``(EvalRun, InputSet, spec, backend, executor facts for the report)``.
    """
    backend = backend_of(model_path).name
    spec = describe(model_path, args.arch, args.sidecar).replace(**_overrides(args))
    found = survey_test_set(args.test_dir)
    blocks = plan_blocks(found.readable, args.block_size)
    workers = args.workers or 2
    if executor == "ray" and not args.threads and backend != "ais_bench":
        # One intra-op thread per actor on a cluster (1 CPU each); locally, share the cores.
        options = {**options, "threads": 1 if args.address else max(1, available_cores() //
                                                                     workers)}
    job = BlockJob(str(args.test_dir.resolve()), str(model_path.resolve()), options,
                   _overrides(args), args.batch_size, args.decoder, args.beam_width)
    facts: dict[str, object] = {"kind": executor, "block_size": args.block_size,
                                "blocks": len(blocks)}
    if executor == "ray":
        ray_run = run_on_ray(job, blocks, workers, address=args.address, backend=backend,
                             device=args.device, progress=True)
        merged = ray_run.merged
        facts.update(workers=workers, address=ray_run.address,
                     start_seconds=ray_run.start_seconds)
    else:
        devices = parse_device_list(args.device)
        merged = run_on_devices(job, blocks, devices, progress=True)
        facts.update(workers=len(devices), devices=[f"npu:{d}" for d in devices])
    lost = [f for f in merged.run.failed if f["stage"] == "worker"]
    facts.update(lost_samples=len(lost), per_worker=merged.workers)
    failed = [{**f, "stage": "preprocess"} for f in merged.failed_decoding]
    missing = missing_range(found)
    if missing:
        failed.append({**missing, "stage": "preprocess"})
    policy = preprocessing_policy(spec, "stream", args.batch_size, 0)
    inputs = InputSet(args.test_dir, [], failed, spec.to_dict(), policy, found.num_samples,
                      str(args.test_dir.resolve()), found.synthetic)
    return merged.run, inputs, spec, backend, facts


def engine_lanes(args) -> tuple[int, int | None]:
    """Engine lanes and intra-op threads per lane for the local executor
    (``pipeline.recognizer.engine_lanes`` of ``--lanes``/``--threads``)."""
    return recognizer_lanes(backend_of(args.model).name, args.device, args.lanes, args.threads)


def evaluate_folder(args) -> dict[str, object]:
    """Everything the CLI does except printing; returns the report.

    Raises:
        ToolchainError: bad arguments, unreadable inputs or model, or inputs made for
            another model.
    """
    model_path = args.model
    check_outputs(args)
    if args.beam_width < 1:
        raise ToolchainError(f"--beam-width must be >= 1, got {args.beam_width}")
    if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
        raise ToolchainError("--batch-size and --workers must be >= 1")
    if args.test_dir and args.label:
        raise ToolchainError("--label goes with --input-npy; --test-dir reads the lmdb's labels")
    options = {"threads": args.threads, "sidecar": args.sidecar, "arch": args.arch,
               "rnn_layout": args.rnn_layout, "gate_order": args.gate_order}
    executor = _check_scale_out(args)
    if args.lanes is not None and (args.lanes < 1 or executor):
        raise ToolchainError("--lanes must be >= 1, and goes with the local executor (Ray "
                             "actors and NPU processes run one batch at a time)")
    if executor:
        run, inputs, spec, backend, facts = _evaluate_in_blocks(args, executor, model_path,
                                                                options)
        report = make_report(run, inputs, spec, backend, str(model_path), args.decoder)
        report["executor"] = facts
        _write_outputs(args, report, run)
        return report
    if args.workers is None:
        args.workers = available_cores()
    lanes, options["threads"] = engine_lanes(args)
    if args.test_dir:
        runner, spec = open_model(model_path, args.device, **options)
        inputs, stream, spec = _stream_inputs(args, spec)
    else:
        if any(v is not None for v in width_overrides(args).values()):
            raise ToolchainError("width options and --tall-crops go with --test-dir; --input-npy "
                                 "was preprocessed already (give them to parse_testdata)")
        inputs = load_input_set(args.input_npy, args.label)
        fallback = (ModelSpec.from_dict(inputs.model, f"{args.input_npy}/manifest.json")
                    if inputs.model else None)
        runner, spec = open_model(model_path, args.device, fallback=fallback, **options)
        check_compatible(spec, inputs.model, str(model_path))
        # The inputs hold the readings they were made with: the report names their policy.
        spec = spec.replace(tall_crops=fallback.tall_crops if fallback else "keep",
                            tall_ratio=fallback.tall_ratio if fallback else spec.tall_ratio)
    with Recognizer(runner, spec, decoder=args.decoder, beam_width=args.beam_width,
                    lanes=lanes) as recognizer:
        if args.test_dir:
            recognizer.check_widths(spec.policy_widths())
            with contextlib.closing(stream.batches):  # decoding workers stop here on any exit
                run = run_batches(recognizer, stream.batches, stream.count, args.warmup,
                                  progress=True)
            inputs.failed = [{**f, "stage": "preprocess"} for f in stream.failed]
        else:
            run = run_evaluation(recognizer, inputs, args.warmup, progress=True)
    report = make_report(run, inputs, spec, runner.name, str(model_path), args.decoder)
    report["executor"] = {"kind": "local", "decoding_workers": args.workers if args.test_dir
                          else 0, "engine_lanes": lanes, "threads_per_lane": options["threads"]}
    _write_outputs(args, report, run)
    return report


def _write_outputs(args, report: dict, run: EvalRun) -> None:
    """report.json and predictions.csv, both or neither."""
    outputs = {}
    if args.report:
        outputs[args.report] = json.dumps(report, indent=2, ensure_ascii=False)
    if args.predictions:
        outputs[args.predictions] = predictions_csv(run)
    write_texts(outputs)  # both appear, or neither


def _run(args) -> int:
    report = evaluate_folder(args)
    for failure in report["failures"][:5]:
        log.warning(
            "sample %d failed (%s): %s", failure["index"], failure.get("stage"), failure["reason"]
        )
    print(summary_line(report))
    return 0 if report["scored"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
