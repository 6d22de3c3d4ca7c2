"""The connection limits uvicorn lacks, as a subclass of its httptools HTTP/1.1 protocol.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``) and
answers 503 past ``limit_concurrency`` only once a request's headers have arrived, so a
connection that never sends a request, or sends half of one, stays open, and enough of them
fill the process's file-descriptor table (then even ``/v2/health/live`` stops answering).
:func:`guarded_protocol` returns the protocol class ``uvicorn.Config(http=...)`` takes, with:

- a **connection cap**: a connection beyond ``max_connections`` open ones is answered at
  once with 503, ``Retry-After`` and ``Connection: close`` in the service's ``{"error"}``
  form, and closed (after the client has had a moment to send its request, so it reads the
  answer instead of a reset); it never reaches the application;
- a **header timeout**: the request line and headers must arrive within ``header_timeout_s``
  of the connection opening, or of the previous response on a keep-alive connection; past
  it a connection that had started a request is answered 408 and closed, an idle one is
  closed (as nginx's ``client_header_timeout`` and Apache's ``RequestReadTimeout`` do);
- **load shedding on the headers**: when ``shed`` (the service's) names a reason for a
  request's method and path (its queue is full, or would not answer in time), the request is
  answered 503 with ``Retry-After`` right there, its body read and dropped, and the
  connection kept; it never reaches the application, so a refusal costs a few microseconds
  of the event loop instead of a trip through the web framework (clients that ignore
  ``Retry-After`` otherwise take the cores the engine needs);
- the **arrival time** of each request (``time.monotonic()`` when its first byte was
  parsed) in the ASGI scope's ``state`` as ``arrival``, so a request's deadline runs from
  arrival rather than from when its handler got the event loop.

The body's own timeout is the application's (``serve.app.read_body``), which answers 408.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on the HTTP connections of one server process.

    Attributes:
        max_connections: most connections open at once (>= 1).
        header_timeout_s: seconds for a request's line and headers to arrive (> 0).
        refuse_linger_s: seconds a refused connection stays open for the client to finish
            sending its request before it is closed (its answer is already written).
        shed: ``shed(method, path)``: the one-line reason to refuse a request now (503), or
            None to let it through; None: no shedding on the headers.
    """

    max_connections: int
    header_timeout_s: float
    refuse_linger_s: float = 1.0
    shed: Callable[[str, str], str | None] | None = None


def _response(status: str, message: str, extra: str = "", keep_alive: bool = False) -> bytes:
    body = json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
    connection = "" if keep_alive else "connection: close\r\n"
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}{connection}\r\n").encode() + body


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``limits`` (see the module docstring).

    Raises:
        ValueError: a limit out of range.
    """
    if limits.max_connections < 1 or not limits.header_timeout_s > 0:
        raise ValueError(f"connection limits out of range: {limits}")
    refusal = _response("503 Service Unavailable",
                        f"the server holds its maximum of {limits.max_connections} connections "
                        f"(--max-connections); retry shortly", "retry-after: 1\r\n")
    too_slow = _response("408 Request Timeout",
                         f"the request's headers did not arrive within "
                         f"{limits.header_timeout_s:g} s (--header-timeout-s)")

    class GuardedProtocol(HttpToolsProtocol):
        """HttpToolsProtocol with a connection cap, a header timeout and arrival times."""

        _header_timer: asyncio.TimerHandle | None = None
        _refused = False
        _request_started = False
        _shedding = False  # the current request was answered 503; its body is dropped
        _close_after_shed = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                self.transport = transport
                transport.write(refusal)  # what the client sends meanwhile is read and dropped
                self.loop.call_later(limits.refuse_linger_s, transport.close)
                return
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if not self._refused:
                super().connection_lost(exc)

        def eof_received(self) -> bool | None:
            return None if self._refused else super().eof_received()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._request_started = True
            self.scope["state"]["arrival"] = time.monotonic()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            if limits.shed is not None and self._shed():
                return
            super().on_headers_complete()

        def _shed(self) -> bool:
            """Answer the request 503 here if the service sheds it; whether it did."""
            if self.cycle is not None and not self.cycle.response_complete:
                return False  # a pipelined request behind one in progress: the app's turn
            method = self.parser.get_method().decode("ascii", "replace")
            path = httptools.parse_url(self.url).path.decode("ascii", "replace")
            reason = limits.shed(method, path)
            if reason is None:
                return False
            keep = self.parser.should_keep_alive() and not self.expect_100_continue
            self.transport.write(_response("503 Service Unavailable", reason,
                                           "retry-after: 1\r\n", keep_alive=keep))
            self._shedding = True
            self._close_after_shed = not keep
            if self.expect_100_continue:
                self.transport.close()  # its client sends no body before a 100 Continue
            else:
                self._arm_header_timer()  # the dropped body is held to the header timeout
            return True

        def on_body(self, body: bytes) -> None:
            if not self._shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._shedding:
                super().on_message_complete()
                return
            self._shedding = False
            if self._close_after_shed:
                self.transport.close()
            else:
                self._arm_header_timer()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._request_started = False
            self._header_timer = self.loop.call_later(limits.header_timeout_s,
                                                      self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._request_started:
                self.transport.write(too_slow)
            self.transport.close()

    return GuardedProtocol


__all__ = ["ConnectionLimits", "guarded_protocol"]
