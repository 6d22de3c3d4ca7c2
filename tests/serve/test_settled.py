"""Awaiting work done on other threads with one event-loop wake-up (``serve.service.settled``)
and the inference endpoints' shortcut past the framework (``serve.app.Shortcut``)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, Future

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from serve.app import Shortcut
from serve.service import results, settled


def _later(future: Future, delay_s: float, value=None, error: Exception | None = None) -> None:
    def complete() -> None:
        time.sleep(delay_s)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    threading.Thread(target=complete, daemon=True).start()


def test_settled_waits_for_every_future_and_keeps_their_order():
    async def run() -> list:
        futures = [Future() for _ in range(5)]
        for index, future in enumerate(futures):  # completed last-first, on other threads
            _later(future, 0.05 * (5 - index), value=index)
        failed = await settled(futures)
        assert failed is None
        assert all(f.done() for f in futures)
        return results(futures, failed)

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]


def test_settled_returns_at_the_first_failure_without_waiting_for_the_rest():
    async def run() -> None:
        slow, failing = Future(), Future()
        _later(failing, 0.01, error=ValueError("bad image"))
        start = time.monotonic()
        failed = await settled([slow, failing])
        assert failed is failing
        assert time.monotonic() - start < 5
        assert not slow.done()
        with pytest.raises(ValueError, match="bad image"):
            results([slow, failing], failed)
        slow.set_result(1)  # a late completion wakes nothing and raises nothing

    asyncio.run(run())


def test_settled_reports_a_cancelled_future_and_handles_done_and_empty_lists():
    async def run() -> None:
        done, cancelled = Future(), Future()
        done.set_result("x")
        cancelled.cancel()
        failed = await settled([done, cancelled])
        assert failed is cancelled
        with pytest.raises(CancelledError):
            results([done, cancelled], failed)
        assert await settled([]) is None
        assert results([done], await settled([done])) == ["x"]

    asyncio.run(run())


def test_settled_fails_with_timeout_at_its_deadline_and_leaves_the_futures():
    async def run() -> None:
        pending = Future()
        with pytest.raises(TimeoutError):
            await settled([pending], time.monotonic() + 0.05)
        assert not pending.done()
        pending.set_result(1)
        # The deadline's timer goes with the settled future: nothing fires later.
        assert await settled([pending], time.monotonic() + 0.01) is None
        await asyncio.sleep(0.05)

    asyncio.run(run())


def _shortcut_app(calls: list[str]) -> Shortcut:
    app = FastAPI()

    @app.post("/service")
    async def routed(request: Request) -> PlainTextResponse:
        calls.append("routed")
        return PlainTextResponse("routed " + (await request.body()).decode())

    @app.get("/service")
    async def get() -> PlainTextResponse:
        return PlainTextResponse("get")

    async def direct(request: Request) -> PlainTextResponse:
        calls.append("direct")
        return PlainTextResponse("direct " + (await request.body()).decode())

    async def broken(request: Request) -> PlainTextResponse:
        raise RuntimeError("a bug in a handler")

    return Shortcut(app, {"/service": direct, "/broken": broken})


def test_the_shortcut_takes_exact_post_paths_and_leaves_the_rest_to_the_app():
    calls: list[str] = []

    async def run() -> None:
        transport = httpx.ASGITransport(app=_shortcut_app(calls), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            posted = await client.post("/service", content=b"img")
            assert (posted.status_code, posted.text) == (200, "direct img")
            got = await client.get("/service")
            assert (got.status_code, got.text) == (200, "get")
            missing = await client.post("/nothing", content=b"img")
            assert missing.status_code == 404
            broken = await client.post("/broken", content=b"img")
            assert broken.status_code == 500

    asyncio.run(run())
    assert calls == ["direct"]  # the exact path never reached the app's own route
