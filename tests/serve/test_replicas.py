"""``python -m serve --replicas 2``: the service as two Ray Serve replicas on a local Ray,
behind each of Ray Serve's ingresses, answering as the offline path does; HAProxy's side
listeners on the loopback interface."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest

from serve.process import ServerProcess
from tests.serve.test_service import offline_batch_1, real_words

pytest.importorskip("ray.serve", reason="requirements-ray.txt (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def model(exported):
    return exported["nano-ocr"]


def haproxy_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of the HAProxy processes under ``pid``."""
    return [(c.laddr.ip, c.laddr.port)
            for child in psutil.Process(pid).children(recursive=True)
            if "haproxy" in child.name()
            for c in child.net_connections("inet") if c.status == psutil.CONN_LISTEN]


@pytest.mark.parametrize("ingress", [None, "proxy"], ids=["haproxy (default)", "proxy"])
def test_two_replicas_answer_as_offline(model, ingress):
    images = real_words(300)
    expected = offline_batch_1(model, images)
    chosen = [] if ingress is None else ["--ray-ingress", ingress]
    with ServerProcess(["--model", str(model), "--name", "crnn", "--replicas", "2", *chosen],
                       ready_timeout=300) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda raw: client.post("/service", content=raw),
                                        images))
            # each replica's own statistics: none ran more than the requests sent
            counts = [client.get("/v2/models/crnn/stats").json()["model_stats"][0]
                      ["inference_count"] for _ in range(4)]
        listeners = haproxy_listeners(server.process.pid)
        log = server.tail(400)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:3]
    assert [a.json()["text"] for a in answers] == [e.text for e in expected]
    np.testing.assert_allclose([a.json()["confidence"] for a in answers],
                               [e.confidence for e in expected], rtol=1e-4)
    assert f"2 replicas of crnn on Ray Serve ({ingress or 'haproxy'} ingress)" in log
    assert "POST /service" not in log  # no per-request log line without --access-log
    if ingress is None:  # the front end on --host, statistics and metrics beside it
        assert len(listeners) >= 3, listeners
        assert server.port in {port for _, port in listeners}, listeners
        assert all(address == "127.0.0.1" for address, _ in listeners), listeners
        assert not {8404, 9101} & {port for _, port in listeners}, listeners
    else:
        assert listeners == []
    assert all(0 < count <= len(images) for count in counts), counts


def test_address_without_replicas_a_broken_model_and_a_busy_port_are_one_line_errors(
        model, tmp_path):
    import socket
    import subprocess
    import sys

    from common.cli import REPO_ROOT

    done = subprocess.run([sys.executable, "-m", "serve", "--model", str(model), "--address",
                           "auto"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --address names the Ray cluster for --replicas; give --replicas N")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    done = subprocess.run([sys.executable, "-m", "serve", "--model", str(broken), "--replicas",
                           "1", "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {broken}: not a readable ONNX model"), last
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serve", "--model", str(model),
                               "--replicas", "1", "--port", str(port)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")
