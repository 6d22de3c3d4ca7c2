"""Scale-out evaluation: Ray Data actors and one process per NPU, against the one-process path.

Ray runs for real (a local cluster started by the fixture below, with 2 CPUs and 2 "NPU"
custom resources, which is how a cluster without Ray's NPU detection declares them); NPUs are
the ais_bench TEST DOUBLE in tests/infer/fake_ais_bench, which can also kill its process
once (``FAKE_AIS_BENCH_DIE_ONCE``) to stand for a worker that dies.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lmdb
import pytest

from common.errors import ToolchainError
from convert.atc import plan_shape
from eval import postprocess
from eval.blocks import BlockJob, plan_blocks
from eval.ray_executor import run_on_ray
from models.onnx_file import read_onnx_spec
from models.sidecar import write_sidecar
from tests.conftest import IIIT5K, encode, word_image, write_lmdb

FAKE = Path(__file__).parents[1] / "infer" / "fake_ais_bench"
SCORED_FIELDS = ("samples", "scored", "failed", "accuracy", "correct", "accuracy_case_sensitive",
                 "one_minus_ned", "cer", "accuracy_over_all_samples", "accuracy_by_width")


@pytest.fixture(scope="module")
def small_lmdb(tmp_path_factory) -> Path:
    """IIIT5K indices 1..40, a corrupt image at 41, and num-samples 42 (42 has no keys)."""
    env = lmdb.open(str(IIIT5K), readonly=True, lock=False)
    with env.begin() as txn:
        entries = {i: (txn.get(b"image-%09d" % i), txn.get(b"label-%09d" % i))
                   for i in range(1, 41)}
    env.close()
    entries[41] = (b"\x89PNG\r\n\x1a\n not an image", b"corrupt")
    return write_lmdb(tmp_path_factory.mktemp("small") / "lmdb", entries, num_samples=42)


@pytest.fixture(scope="module")
def fake_om(tmp_path_factory, fixed_models) -> Path:
    """A stand-in .om of nano-ocr (its ONNX bytes, run by the test double) with its sidecar."""
    onnx_path = fixed_models["nano-ocr"]
    om = tmp_path_factory.mktemp("om") / "nano_linux_x86_64.om"
    shutil.copy(onnx_path, om)
    plan = plan_shape("Ascend310P3", "imgs", 1, 32, min_width=32, max_width=320,
                      min_accepted_width=4)
    write_sidecar(om, plan, read_onnx_spec(onnx_path), "Ascend310P3", ["atc"], onnx_path)
    return om


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray with 2 CPUs and 2 NPU resources; its workers import the ais_bench double.

    Ray's workers get the environment Ray started with, so the double's path and its log and
    die-once files are set for ``ray.init`` only; this process keeps its own.
    """
    import ray  # requirements-ray.txt, which scripts/test.sh installs: a failure, not a skip

    folder = tmp_path_factory.mktemp("ray")
    (folder / "died").touch()  # disarmed: a test removes it to kill the next worker that infers
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(FAKE))
        patch.setenv("FAKE_AIS_BENCH_LOG", str(folder / "calls.jsonl"))
        patch.setenv("FAKE_AIS_BENCH_DIE_ONCE", str(folder / "died"))
        patch.setenv("FAKE_AIS_BENCH_DIE_ALWAYS", str(folder / "die_always"))
        ray.init(num_cpus=2, resources={"NPU": 2}, include_dashboard=False)
    yield folder
    ray.shutdown()


def _run(capsys, *args) -> tuple[int, str]:
    code = postprocess.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _predictions(path: Path) -> dict[int, str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {int(row["index"]): row["prediction"] for row in csv.DictReader(handle)}


def _one_process(tmp_path, capsys, lmdb_path, *model) -> tuple[dict, dict]:
    out = tmp_path / "one"
    out.mkdir(exist_ok=True)
    code, err = _run(capsys, "--test-dir", lmdb_path, *model, "--workers", 1,
                     "--report", out / "report.json", "--predictions", out / "predictions.csv")
    assert code == 0, err
    return (json.loads((out / "report.json").read_text()),
            _predictions(out / "predictions.csv"))


def test_plan_blocks_cover_every_index_once():
    assert plan_blocks(10, 4) == [(1, 5), (5, 9), (9, 11)]
    assert plan_blocks(3, 256) == [(1, 4)]
    with pytest.raises(ToolchainError, match="--block-size must be >= 1"):
        plan_blocks(3, 0)


@pytest.mark.parametrize("args, message", [
    (["--executor", "ray", "--input-npy", "x", "--onnx-path", "m.onnx"], "give --test-dir"),
    (["--device", "0,1", "--onnx-path", "m.onnx"], "needs --om-path"),
    (["--device", "0,cpu", "--om-path", "m.om"], "names NPUs"),
    (["--device", "1,1", "--om-path", "m.om"], "named twice"),
    (["--address", "auto", "--onnx-path", "m.onnx"], "--address goes with --executor ray"),
    (["--executor", "ray", "--device", "0,1", "--om-path", "m.om"], "leave out the device list"),
    (["--executor", "ray", "--device", "cuda:1", "--onnx-path", "m.onnx"],
     "Ray gives each actor its own device; give cuda without an index"),
    (["--device", "npu,npu:0", "--om-path", "m.om"], "named twice"),  # npu is npu:0
])
def test_options_that_do_not_go_together_are_one_line(tmp_path, small_lmdb, capsys, args,
                                                      message):
    source = [] if "--input-npy" in args else ["--test-dir", small_lmdb]
    code, err = _run(capsys, *source, *args)
    assert code != 0 and message in err
    assert "Traceback" not in err


def test_ray_missing_is_a_clear_error(monkeypatch, small_lmdb, fixed_models, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if not installed
    code, err = _run(capsys, "--test-dir", small_lmdb, "--onnx-path", fixed_models["nano-ocr"],
                     "--executor", "ray")
    assert code != 0 and "pip install -r requirements-ray.txt" in err


def test_ray_client_addresses_are_refused_before_connecting(small_lmdb, fixed_models, capsys):
    code, err = _run(capsys, "--test-dir", small_lmdb, "--onnx-path", fixed_models["nano-ocr"],
                     "--executor", "ray", "--address", "ray://head:10001")
    assert code != 0 and "does not run through Ray Client" in err and "--address auto" in err


def test_ray_two_workers_equal_one_process_on_iiit5k(tmp_path, local_ray, fixed_models, capsys):
    """All 3000 IIIT5K samples: the same predictions and report figures as one process."""
    model = ["--onnx-path", fixed_models["nano-ocr"]]
    one_report, one = _one_process(tmp_path, capsys, IIIT5K, *model)
    out = tmp_path / "ray"
    out.mkdir()
    code, err = _run(capsys, "--test-dir", IIIT5K, *model, "--executor", "ray", "--workers", 2,
                     "--report", out / "report.json", "--predictions", out / "predictions.csv")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert _predictions(out / "predictions.csv") == one and len(one) == 3000
    assert {k: report[k] for k in SCORED_FIELDS} == {k: one_report[k] for k in SCORED_FIELDS}
    executor = report["executor"]
    assert executor["kind"] == "ray" and executor["workers"] == 2 and executor["blocks"] == 12
    assert len(executor["per_worker"]) == 2  # both actors recognised blocks
    assert sum(w["samples"] for w in executor["per_worker"]) == 3000


def test_ray_worker_death_fails_only_its_block(tmp_path, local_ray, small_lmdb, fake_om, capsys,
                                               monkeypatch):
    """The double kills the first actor that infers; Ray restarts it, the rest goes on."""
    monkeypatch.syspath_prepend(str(FAKE))  # the one-process run here uses the double too
    one_report, one = _one_process(tmp_path, capsys, small_lmdb, "--om-path", fake_om,
                                   "--device", "npu:0")
    (local_ray / "died").unlink(missing_ok=True)  # arm the double: the next infer dies
    out = tmp_path / "ray"
    out.mkdir()
    code, err = _run(capsys, "--test-dir", small_lmdb, "--om-path", fake_om, "--executor", "ray",
                     "--workers", 2, "--block-size", 8, "--report", out / "report.json",
                     "--predictions", out / "predictions.csv")
    assert code == 0, err
    assert (local_ray / "died").exists()
    report = json.loads((out / "report.json").read_text())
    lost = [f for f in report["failures"] if f["stage"] == "worker"]
    assert len(lost) == 8 and "died or raised" in lost[0]["reason"]
    start = lost[0]["index"]
    assert [f["index"] for f in lost] == list(range(start, start + 8))
    assert (start - 1) % 8 == 0  # exactly one planned block
    assert report["executor"]["lost_samples"] == 8
    # Everything else is as in one process: 40 decodable, 1 corrupt, 1 without keys.
    predictions = _predictions(out / "predictions.csv")
    assert predictions == {i: p for i, p in one.items() if not start <= i < start + 8}
    assert report["samples"] == 42 and report["scored"] == 32 and report["failed"] == 10
    assert {f["index"] for f in report["failures"]} - {f["index"] for f in lost} == {41, 42}
    # Each actor ran on its one visible NPU, as npu:0.
    calls = [json.loads(line) for line in (local_ray / "calls.jsonl").read_text().splitlines()]
    assert {c["device_id"] for c in calls} == {0}


def test_ray_run_whose_every_actor_died_past_its_restarts_ends(tmp_path, local_ray, small_lmdb,
                                                               fake_om, capsys):
    """Every infer kills its actor: the pool runs out of restarts, and the run still ends
    (it used to spin at 100 % CPU with no report), every sample counted as lost."""
    (local_ray / "die_always").touch()
    try:
        out = tmp_path / "ray"
        out.mkdir()
        code, err = _run(capsys, "--test-dir", small_lmdb, "--om-path", fake_om, "--executor",
                         "ray", "--workers", 2, "--block-size", 4, "--report",
                         out / "report.json", "--predictions", out / "predictions.csv")
    finally:
        (local_ray / "die_always").unlink()
    assert code == 1, err  # nothing scored
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 0 and report["failed"] == 42
    assert report["executor"]["lost_samples"] == 40
    lost = [f for f in report["failures"] if f["stage"] == "worker"]
    assert [f["index"] for f in lost] == list(range(1, 41))


def test_ray_actor_that_cannot_read_the_data_is_one_line(tmp_path, local_ray, fixed_models):
    """The driver read the lmdb but a worker cannot (a path missing on its node)."""
    job = BlockJob(str(tmp_path / "not_on_this_node"), str(fixed_models["nano-ocr"]))
    with pytest.raises(ToolchainError, match=r"^worker .*not_on_this_node: not an lmdb folder"):
        run_on_ray(job, [(1, 5)], 1, address=None, backend="onnxruntime", device=None,
                   progress=False)


def test_ray_cluster_without_enough_npus_is_refused(local_ray, small_lmdb, fake_om):
    job = BlockJob(str(small_lmdb), str(fake_om))
    with pytest.raises(ToolchainError, match="--workers 3 needs 3 NPU in the Ray cluster, "
                                             "which has 2"):
        run_on_ray(job, [(1, 5)], 3, address=None, backend="ais_bench", device=None,
                   progress=False)


@pytest.fixture
def double_env(tmp_path, monkeypatch):
    """The ais_bench double for spawned processes, logging its sessions to calls.jsonl."""
    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    monkeypatch.setenv("FAKE_AIS_BENCH_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.syspath_prepend(str(FAKE))
    return tmp_path


def test_one_process_per_npu_equals_one_process(double_env, small_lmdb, fake_om, capsys):
    tmp_path = double_env
    one_report, one = _one_process(tmp_path, capsys, small_lmdb, "--om-path", fake_om,
                                   "--device", "npu:0")
    (tmp_path / "calls.jsonl").unlink()
    out = tmp_path / "npu"
    out.mkdir()
    code, err = _run(capsys, "--test-dir", small_lmdb, "--om-path", fake_om, "--device", "0,1",
                     "--block-size", 8, "--report", out / "report.json",
                     "--predictions", out / "predictions.csv")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert _predictions(out / "predictions.csv") == one
    assert {k: report[k] for k in SCORED_FIELDS} == {k: one_report[k] for k in SCORED_FIELDS}
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert sorted(c["device_id"] for c in calls) == [0, 1]  # one session per device,
    assert len({c["pid"] for c in calls}) == 2  # each in its own process
    assert report["executor"]["devices"] == ["npu:0", "npu:1"]


def test_a_dead_npu_process_fails_only_its_block(double_env, small_lmdb, fake_om, monkeypatch,
                                                 capsys):
    tmp_path = double_env
    _, one = _one_process(tmp_path, capsys, small_lmdb, "--om-path", fake_om,
                          "--device", "npu:0")
    monkeypatch.setenv("FAKE_AIS_BENCH_DIE_ONCE", str(tmp_path / "died"))
    out = tmp_path / "npu"
    out.mkdir()
    code, err = _run(capsys, "--test-dir", small_lmdb, "--om-path", fake_om, "--device", "0,1",
                     "--block-size", 8, "--report", out / "report.json",
                     "--predictions", out / "predictions.csv")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    lost = [f for f in report["failures"] if f["stage"] == "worker"]
    assert len(lost) == 8 and "died while recognising block" in lost[0]["reason"]
    start = lost[0]["index"]
    assert _predictions(out / "predictions.csv") == {
        i: p for i, p in one.items() if not start <= i < start + 8}
    # The device got a new process, which went on with later blocks.
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1 + 2 + 1  # the one-process run, two devices, one restart


def test_an_npu_process_that_cannot_start_is_one_line(small_lmdb, fake_om, capsys):
    """The driver reads the sidecar; the device processes lack ais_bench (no double here)."""
    code, err = _run(capsys, "--test-dir", small_lmdb, "--om-path", fake_om, "--device", "0,1")
    assert code != 0
    assert "worker " in err and "npu:0" in err and "needs ais_bench, which is not installed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unreadable_sample_in_a_block_is_recorded(double_env, fake_om, capsys):
    """A block with a corrupt image and a missing label: both recorded, with the reasons."""
    lmdb_path = write_lmdb(double_env / "odd", {
        1: (encode(word_image("good", 100, 32, "RGB")), b"good"),
        2: (b"garbage", b"bad"),
        3: (encode(word_image("nolabel")), None),
    }, num_samples=3)
    out = double_env / "npu"
    out.mkdir()
    code, err = _run(capsys, "--test-dir", lmdb_path, "--om-path", fake_om, "--device", "0,1",
                     "--report", out / "report.json")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 1 and report["failed"] == 2
    assert [(f["index"], f["stage"]) for f in report["failures"]] == [(2, "preprocess"),
                                                                      (3, "preprocess")]
