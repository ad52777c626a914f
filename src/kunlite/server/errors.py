"""Errors as the OpenAI API sends them: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `ApiError`; the app turns it into that body with its status (and Retry-After
for 429). Anything else that escapes a handler is a bug and becomes a 500 with a generic
message (the traceback goes to the log, not to the client).
"""

from __future__ import annotations

import math
import re

import msgspec
from starlette.responses import Response

from kunlite.server.protocol import ErrorInfo, ErrorResponse, encoder

# status -> the OpenAI error type
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds; only for 429 / 503

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, _TYPES.get(self.status, "invalid_request_error"),
                                       self.param, self.code))

    def response(self) -> Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(retry_after_header(self.retry_after))
        return Response(encoder.encode(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")


def retry_after_header(seconds: float) -> int:
    """Retry-After takes whole seconds; never 0, so that a client does not spin."""
    return max(1, math.ceil(seconds))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]*)`")


def from_decode_error(e: Exception) -> ApiError:
    """A 400 for a body msgspec could not decode, naming the field when it can
    (`Expected `int`, got `str` - at `$.max_tokens`` -> param "max_tokens")."""
    if isinstance(e, RecursionError):
        return bad_request("the request body is nested too deeply")
    if isinstance(e, UnicodeDecodeError):
        return bad_request("the request body is not valid UTF-8")
    message = str(e)
    match = _PATH.search(message)
    param = match.group(1) if match else ""  # the full path, e.g. "messages[0].content"
    param = param.split("[...]")[0]  # a value of a mapping ("logit_bias[...]") is the mapping's field
    missing = _MISSING.match(message)
    if missing:  # "Object missing required field `role` - at `$.messages[0]`"
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    if isinstance(e, msgspec.ValidationError):
        return bad_request(f"invalid request: {message}", param or None)
    return bad_request(f"the request body is not valid JSON: {message}")
