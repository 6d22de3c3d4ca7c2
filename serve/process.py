"""Run ``python -m serve`` as a child process on 127.0.0.1 at a free port (tests, benches).

``with ServerProcess(["--model", "m.onnx"]) as server: httpx.get(server.url + "/metrics")``
starts the server, waits until its readiness probe answers 200, and on exit sends SIGTERM and
waits for the process to end (it drains first).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from common.cli import REPO_ROOT
from common.errors import ToolchainError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (``VmRSS`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ToolchainError(f"process {pid} reports no VmRSS")


class ServerProcess:
    """``python -m serve ARGS --host 127.0.0.1 --port FREE`` as a child process.

    Args:
        args: ``serve``'s options (``--model`` at least), without ``--host``/``--port``.
        ready_timeout: seconds to wait for readiness before giving up.
        wait_ready: False to return as soon as the process is started (to watch it load).

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        grpc_address: ``127.0.0.1:PORT`` of its gRPC endpoint (a free port unless ``args``
            name ``--grpc-port``; None for ``--grpc-port 0``).
        log: the path of the server's combined stdout/stderr.
        process: the ``subprocess.Popen``.

    Raises:
        ToolchainError: (on entry) the server exited or was not ready in time; the message
            holds the end of its log.
    """

    def __init__(self, args: Sequence[str], ready_timeout: float = 120.0,
                 wait_ready: bool = True) -> None:
        self.args = list(args)
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if "--grpc-port" not in self.args:  # not the default 8081: servers run side by side
            self.args += ["--grpc-port", str(free_port())]
        grpc_port = int(self.args[self.args.index("--grpc-port") + 1])
        #: ``127.0.0.1:PORT`` of the gRPC endpoint (``tritonclient.grpc``), None without one.
        self.grpc_address = f"127.0.0.1:{grpc_port}" if grpc_port else None
        self._log_dir = tempfile.TemporaryDirectory(prefix="serve-log-")
        self.log = Path(self._log_dir.name) / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serve", *self.args, "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if self.wait_ready:
            try:
                self.wait_until_ready()
            except BaseException:  # not ready, or Ctrl-C while waiting: leave no server behind
                self.stop()
                raise
        return self

    def ready_status(self) -> int | None:
        """The readiness probe's status code, or None when nothing answers yet."""
        try:
            with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_until_ready(self) -> None:
        """Block until readiness is 200.

        Raises:
            ToolchainError: the process exited, or ``ready_timeout`` passed.
        """
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ToolchainError(f"the server exited with {self.process.returncode}: "
                                     f"{self.tail()}")
            if self.ready_status() == 200:
                return
            time.sleep(0.1)
        raise ToolchainError(f"the server was not ready within {self.ready_timeout:g} s: "
                             f"{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The last lines of the server's log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """Send SIGTERM (the server drains, then exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait up to ``timeout`` seconds (then SIGKILL); the exit status."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self._log_dir.cleanup()
