"""A deadline for a request's headers, which uvicorn does not have: its h11 protocol waits
forever on a socket that sends its headers a byte at a time, or that connects and sends
nothing. (The body's deadline is the app's, in http_guard.read_body: the headers never reach
the app.)

The clock starts when the connection is made, and again at the first byte of each later
request on it; it stops when h11 has parsed the request's headers. A connection still short
of its headers then gets a 408 with the OpenAI error body and is closed; one that sent
nothing at all is just closed, like an idle keep-alive connection.

The server always runs uvicorn's h11 protocol with this deadline, httptools installed or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kunlite.server.errors import ApiError
from kunlite.server.protocol import encoder


def _timeout_response(seconds: float) -> bytes:
    body = encoder.encode(ApiError(408, f"the request headers did not arrive within {seconds:g} s",
                                   code="request_timeout").body())
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the deadline above; `headers_timeout` and `on_timeout` (called
    for each 408) are set by `h11_protocol_with_header_timeout`."""

    headers_timeout: float = 10.0
    on_timeout: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Runs on every chunk received and after each response (for pipelined requests)."""
        super().handle_events()
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._disarm()  # the headers are in (or the connection is over)
        elif self._headers_timer is None and self.conn.trailing_data[0]:
            self._arm()  # the first bytes of a later request on a kept-alive connection

    def _arm(self) -> None:
        self._headers_timer = self.loop.call_later(self.headers_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is closed
            self.transport.write(_timeout_response(self.headers_timeout))
            if self.on_timeout is not None:
                self.on_timeout()
        self.transport.close()


def h11_protocol_with_header_timeout(headers_timeout: float,
                                     on_timeout: Callable[[], None] | None = None) -> type[H11Protocol]:
    """The protocol class to give uvicorn.Config(http=...)."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,),
                {"headers_timeout": headers_timeout, "on_timeout": staticmethod(on_timeout) if on_timeout else None})
