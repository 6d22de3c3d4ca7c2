"""What slow, idle, stalled and too many clients get: a real server process, raw sockets.

Each case held a connection (or a request) open for as long as the client liked before
``serve.protocol`` and the admission before the body; the timeouts here are short so the
tests run in seconds.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from common.errors import ToolchainError
from serve.__main__ import connection_cap
from serve.process import ServerProcess
from tests.serve.test_service import real_words, wait_for_metric


def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``seconds`` pass:
    then the bytes so far and ``inf``), and when it closed, in seconds from now."""
    start = time.monotonic()
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() - start < seconds:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, float("inf")


def _read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole answer (its head and Content-Length bytes of body) off a kept connection,
    each read within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _answer(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


@pytest.fixture(scope="module")
def server(exported):
    with ServerProcess(["--model", str(exported["nano-ocr"]), "--header-timeout-s", "1",
                        "--body-timeout-s", "1", "--keep-alive-s", "1",
                        "--max-connections", "8"]) as running:
        yield running


def test_a_connection_that_never_sends_a_request_is_closed(server):
    with _connect(server) as sock:
        data, closed = _read_until_closed(sock, 8)
    assert data == b"" and closed < 5  # closed silently once the header timeout passed


def test_stalled_headers_are_answered_408_and_closed(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Len")
        data, closed = _read_until_closed(sock, 8)
    status, headers, body = _answer(data)
    assert status == 408 and closed < 5
    assert "headers did not arrive within 1 s" in body["error"]
    assert headers["connection"] == "close"


def test_a_stalled_body_is_answered_408_and_closed(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                     + b"\x89PNG" * 10)
        data, closed = _read_until_closed(sock, 8)
    status, headers, body = _answer(data)
    assert status == 408 and closed < 5
    assert "body did not arrive within 1 s" in body["error"]


def test_an_idle_keep_alive_connection_is_closed(server):
    image = real_words(1)[0]
    with _connect(server) as sock:
        sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(image) + image)
        data, closed = _read_until_closed(sock, 8)
    status, _, body = _answer(data)
    assert status == 200 and body["text"] and closed < 5


def test_connections_past_the_cap_get_503_and_the_server_keeps_answering(server):
    """8 idle connections hold the cap; the 9th (a health probe) is answered 503 at once;
    once they are closed by the header timeout, the probe answers 200."""
    idle = [_connect(server) for _ in range(8)]
    try:
        time.sleep(0.2)
        with _connect(server) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            data, closed = _read_until_closed(sock, 5)
        status, headers, body = _answer(data)
        assert status == 503 and headers["retry-after"] == "1"
        assert "maximum of 8 connections" in body["error"]
        assert closed < 3
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200


def test_a_connection_cap_beyond_the_open_file_limit_is_one_line():
    with pytest.raises(ToolchainError, match="--max-connections 100000000 does not fit the "
                                             "open-file limit"):
        connection_cap(100_000_000)
    assert 1 <= connection_cap(None) <= 1000


def test_a_full_queue_refuses_before_the_body_is_read(exported):
    """Three requests fill the queue; a fourth that has sent only its headers is answered
    503 at once, without waiting for its body."""
    image = real_words(1)[0]
    with ServerProcess(["--model", str(exported["nano-ocr"]), "--max-wait-ms", "1500",
                        "--max-batch-size", "64", "--max-queue", "3"]) as running, \
            httpx.Client(base_url=running.url, timeout=30) as client, \
            ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(client.post, "/service", content=image) for _ in range(3)]
        wait_for_metric(client, "ocr_queue_depth", 3, seconds=5)
        with _connect(running) as sock:
            sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            data = _read_answer(sock, timeout=1.0)  # before: no answer until the body came
            status, headers, body = _answer(data)
            assert status == 503 and headers["retry-after"] == "1"
            assert "queue is full" in body["error"] and "connection" not in headers
            with _connect(running) as waiting_for_100:  # refused and closed: no body comes
                waiting_for_100.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nExpect: "
                                        b"100-continue\r\nContent-Length: 10\r\n\r\n")
                data, closed = _read_until_closed(waiting_for_100, 5)
            assert _answer(data)[0] == 503 and closed < 1
            sock.sendall(b"\0" * 100000)  # the refused body is read and dropped
            assert [f.result().status_code for f in waiting] == [200] * 3
            # The same connection serves the next request.
            sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(image) + image)
            status, _, body = _answer(_read_answer(sock))
            assert status == 200 and body["text"]
        metrics = client.get("/metrics").text
        assert 'ocr_requests_total{endpoint="service",status="503"} 2.0' in metrics


def test_the_deadline_runs_from_arrival_not_from_the_body(exported):
    """Headers now, the body 1.2 s later, with an 800 ms deadline: 504, and the engine never
    runs it (before, the deadline started once the body was in, and the answer was 200)."""
    image = real_words(1)[0]
    with ServerProcess(["--model", str(exported["nano-ocr"]), "--timeout-ms", "800"]) \
            as running:
        with _connect(running) as sock:
            sock.sendall(b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(image))
            time.sleep(1.2)
            sock.sendall(image)
            data = _read_answer(sock)
        status, _, body = _answer(data)
        assert status == 504 and "from its arrival) passed while its body was read" in \
            body["error"]
        metrics = httpx.get(running.url + "/metrics", timeout=10).text
        assert "ocr_batch_size_count 0.0" in metrics
