"""Ray Serve's HAProxy ingress with its side listeners on the loopback interface only.

Ray Serve 2.60 renders HAProxy's configuration from a fixed template
(``ray.serve._private.haproxy_templates``): the statistics page listens with ``bind
*:STATS_PORT`` and the Prometheus exporter with ``bind :METRICS_PORT``, both on every
interface, and the admin socket is created ``mode 666`` (any local user may drain or
re-point the backends). Ray starts the program named by ``RAY_SERVE_HAPROXY_BINARY_PATH`` as
``PROGRAM -db -f CONFIG [-dR] [-sf PID ...] [-x SOCKET]``, and again with ``-sf`` on every
reload. :func:`write_launcher` writes such a program: a two-line shell script that runs this
file, which writes ``CONFIG`` with :func:`loopback_config` applied into the launcher's own
folder and replaces itself (``os.execv``, so Ray's pid and signals reach HAProxy itself) with
the real HAProxy on that copy. The HTTP frontend (``--host:--port``) is untouched.

This file runs as a script (``python haproxy_launcher.py REAL_HAPROXY FOLDER ARGS...``) and imports
only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from pathlib import Path

#: ``bind :PORT`` and ``bind *:PORT`` (every interface), as Ray's template writes them.
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)\b", re.MULTILINE)
#: The admin socket's permissions in Ray's template.
_SOCKET_MODE = re.compile(r"^(\s*stats\s+socket\s+\S+\s+mode\s+)666\b", re.MULTILINE)


def loopback_config(text: str, host: str = "127.0.0.1") -> str:
    """HAProxy configuration ``text`` with every wildcard ``bind`` on ``host`` and the admin
    socket readable by its owner only (``mode 600``); other lines unchanged."""
    text = _WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", text)
    return _SOCKET_MODE.sub(r"\g<1>600", text)


def write_launcher(folder: Path, haproxy: str) -> Path:
    """Write the launcher program into ``folder`` (ours, where the rewritten configurations
    go too) for the HAProxy binary ``haproxy``; returns its path, for
    ``RAY_SERVE_HAPROXY_BINARY_PATH``."""
    launcher = folder / "haproxy"
    launcher.write_text("#!/bin/sh\n" + shlex.join([
        "exec", sys.executable, str(Path(__file__).resolve()), haproxy, str(folder)])
        + ' "$@"\n')
    launcher.chmod(0o700)
    return launcher


def _launch(haproxy: str, folder: Path, arguments: list[str]) -> None:
    """Write the configuration after ``-f`` rewritten into ``folder`` and exec ``haproxy``
    on that copy, the other arguments unchanged."""
    position = arguments.index("-f") + 1
    source = Path(arguments[position])
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    target = folder / f"haproxy-{digest}.cfg"
    partial = target.with_suffix(f".{os.getpid()}.part")
    try:
        partial.write_text(loopback_config(source.read_text()))
        partial.replace(target)  # a running HAProxy keeps the copy it parsed
    except OSError as exc:  # one line in HAProxy's log, which Ray Serve reports
        raise SystemExit(f"haproxy_launcher: {exc.filename}: {exc.strerror}") from None
    arguments[position] = str(target)
    os.execv(haproxy, [haproxy, *arguments])


if __name__ == "__main__":
    if len(sys.argv) < 3 or "-f" not in sys.argv[3:-1]:
        raise SystemExit("usage: haproxy_launcher.py HAPROXY FOLDER ... -f CONFIG ...")
    _launch(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
