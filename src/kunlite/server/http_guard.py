"""What stands between a JSON endpoint and a careless or hostile client: the content type,
CORS, and reading the body within a size limit and a deadline.

- Content type (the hole of FastAPI's CVE-2021-32677): browsers send text/plain, form and
  multipart bodies from any web page without a CORS preflight, so a body declared as anything
  but JSON gets 415. A body with no Content-Type is read as JSON, as curl users expect, unless
  the request carries an Origin header: a browser sends a body without one too (fetch with a
  Blob or an ArrayBuffer), and a page that may call the API can always declare JSON.
- CORS is off unless --allowed-origins names origins; then Starlette's CORSMiddleware answers
  preflights, its refusals in the OpenAI error body.
- The body must arrive within `timeout` seconds of the start of its reading (408 with
  `Connection: close` otherwise), and a client that goes away mid-body raises Starlette's
  ClientDisconnect, which the app counts and does not log as an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from kunlite.server.errors import ApiError

DISCONNECTED_STATUS = 499  # nginx's "client closed request"; nobody reads it


def is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, with any parameters (charset=utf-8)."""
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON, or declared as nothing by a non-browser client."""
    declared = request.headers.get("content-type")
    if declared is None and "origin" not in request.headers:
        return
    if declared is None or not is_json(declared):
        shown = "none" if declared is None else repr(declared[:100])
        raise ApiError(415, f"the request body must be JSON, sent with `Content-Type: application/json` "
                            f"(got {shown})", code="unsupported_media_type")


class RequestTimeout(ApiError):
    """408: the body did not arrive in time. The connection is closed after the response, since
    the rest of a body that is still on its way would be read as the next request."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message, code="request_timeout")

    def response(self) -> Response:
        response = super().response()
        response.headers["Connection"] = "close"
        return response


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, or: 413 as soon as it is known to be larger than `limit` bytes (from
    Content-Length, or while reading a body that has none or lies), RequestTimeout if it has
    not all arrived `timeout` seconds after the call, ClientDisconnect if the client went away."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size, more = [], 0, True
    while more:
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


class _CORSMiddleware(CORSMiddleware):
    """Starlette's, with a refused preflight in the OpenAI error body (with the CORS headers
    Starlette computed for it)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = ApiError(400, bytes(response.body).decode(), code="cors_preflight_refused").response()
        for name, value in response.headers.items():
            if name.startswith("access-control-") or name == "vary":
                refused.headers[name] = value
        return refused


def cors_middleware(allowed_origins: Sequence[str]) -> list[Middleware]:
    """CORS for the given origins ("*": any), or nothing at all when there are none. A page of
    an allowed origin may send any header (the API key, the openai client's x-stainless-*) and
    read Retry-After; no cookies are involved."""
    if not allowed_origins:
        return []
    return [Middleware(_CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=["Retry-After"])]
