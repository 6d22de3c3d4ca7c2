"""The fair preprocessing pool: one request's many images do not hold back another's one."""

from __future__ import annotations

import threading

import pytest

from serve.pool import FairPool


def test_jobs_run_round_robin_across_requests():
    """A 10-image request is queued, then a 1-image one: the one image runs second, not
    eleventh (a plain FIFO pool ran the big request's images first)."""
    pool = FairPool(1)
    release = threading.Event()
    order: list[str] = []

    def job(name: str) -> str:
        if name == "big0":
            release.wait(10)
        order.append(name)
        return name

    big = [pool.submit("big", job, f"big{i}") for i in range(10)]
    small = pool.submit("small", job, "small0")
    release.set()
    assert small.result(10) == "small0"
    assert [f.result(10) for f in big] == [f"big{i}" for i in range(10)]
    assert order[:3] == ["big0", "small0", "big1"]
    pool.shutdown()


def test_a_cancelled_job_is_dropped_and_failures_reach_the_caller():
    pool = FairPool(1)
    gate = threading.Event()
    ran: list[int] = []
    first = pool.submit("a", gate.wait, 10)
    dropped = pool.submit("a", ran.append, 1)
    assert dropped.cancel()
    failing = pool.submit("b", int, "not a number")
    gate.set()
    first.result(10)
    with pytest.raises(ValueError):
        failing.result(10)
    pool.shutdown()
    assert ran == []
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("a", print)
    with pytest.raises(ValueError):
        FairPool(0)
