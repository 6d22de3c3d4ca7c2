"""Joining a Ray cluster: an address where nothing answers fails at once, before Ray retries."""

from __future__ import annotations

import socket
import time

import pytest

from common.errors import ToolchainError
from common.ray_cluster import check_reachable, join_ray


class RecordingRay:
    """A test double of the ``ray`` module: records ``init`` calls, connects nothing."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)


def _closed_port() -> int:
    with socket.socket() as probe:  # bound and closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_where_nothing_answers_is_one_line_at_once():
    ray = RecordingRay()
    address = f"127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    with pytest.raises(ToolchainError, match=f"cluster at {address}: nothing answers there"):
        join_ray(ray, address, None)
    assert time.monotonic() - began < 5 and ray.calls == []


def test_a_listening_address_and_auto_go_on_to_ray():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        check_reachable(address)  # answers: no error
        ray = RecordingRay()
        assert join_ray(ray, address, None) is True
        assert ray.calls[0]["address"] == address
    ray = RecordingRay()
    assert join_ray(ray, "auto", None) is True  # Ray finds the cluster itself
    assert ray.calls[0]["address"] == "auto"
    with pytest.raises(ToolchainError, match="no-such-host.invalid"):
        check_reachable("no-such-host.invalid:6379", timeout=2)
