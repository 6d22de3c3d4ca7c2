"""Start or join a Ray cluster for the tools that scale out on it (``eval.ray_executor``,
``serve.replicas``); Ray is an optional dependency (requirements-ray.txt), imported here
lazily.

The project's packages travel to the cluster's workers as Ray ``py_modules``
(:func:`project_packages`), so a node needs the Python environment (requirements.txt and
requirements-ray.txt) but not this checkout.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path

from common.cli import REPO_ROOT
from common.errors import ToolchainError

INSTALL_HINT = "install it with: pip install -r requirements-ray.txt"
#: Seconds :func:`check_reachable` waits for the cluster's port to answer.
CONNECT_TIMEOUT = 5.0
#: Ray Serve's HTTP ingresses (``python -m serve --replicas N --ray-ingress``), the default
#: first: its HAProxy ingress, forwarding to the replicas, and its Python HTTP proxy.
SERVE_INGRESSES = ("haproxy", "proxy")


def import_ray(what: str, modules: Sequence[str] = ()):
    """``ray`` (and ``modules`` such as ``ray.data``, ``ray.serve``), imported.

    Args:
        what: the option that needs Ray, for the message (``--executor ray``).

    Raises:
        ToolchainError: Ray (or one of ``modules``) is not installed.
    """
    try:
        import importlib

        import ray

        for module in modules:
            importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ToolchainError(f"{what} needs Ray ({exc.name} is missing); {INSTALL_HINT}") \
            from None
    return ray


def project_packages() -> list[str]:
    """The paths of the project's top-level packages (folders with an ``__init__.py``,
    tests excluded): what a worker may import."""
    return sorted(str(p.parent) for p in Path(REPO_ROOT).glob("*/__init__.py")
                  if p.parent.name != "tests")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise at once where nothing answers at a ``HOST:PORT`` cluster address (Ray itself
    retries its GCS connection for minutes first). ``auto``, ``ray://`` addresses and anything
    else Ray resolves itself are left to Ray.

    Raises:
        ToolchainError: the port refuses, or does not answer within ``timeout`` seconds, or the
            host name does not resolve (one line naming the address).
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ToolchainError(f"cannot join the Ray cluster at {address}: nothing answers there "
                             f"({reason}); start it with `ray start --head` or check the "
                             "address") from None


def join_ray(ray, address: str | None, num_cpus: int | None) -> bool:  # noqa: ANN001 - ray
    """Join the cluster at ``address`` (``auto``, ``HOST:6379``), or start a local Ray with
    ``num_cpus`` CPUs (None: all) when ``address`` is None; nothing when this process is
    already connected. The project's packages go along as ``py_modules``.

    Returns:
        Whether this call connected (the caller then calls ``ray.shutdown()``).

    Raises:
        ToolchainError: nothing answers at a ``HOST:PORT`` address (:func:`check_reachable`),
            or the cluster cannot be joined (with the token hint when it asks for
            authentication).
    """
    if ray.is_initialized():
        return False
    runtime_env = {"py_modules": project_packages()}
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                     logging_level=logging.WARNING)
    except ConnectionError as exc:
        hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token here "
                "(the token is read from ~/.ray/auth_token or $RAY_AUTH_TOKEN)"
                if isinstance(exc.__cause__, ray.exceptions.AuthenticationError) else "")
        raise ToolchainError(f"cannot join the Ray cluster at {address}: {exc}{hint}") from None
    return True


__all__ = ["INSTALL_HINT", "check_reachable", "import_ray", "join_ray", "project_packages"]
