"""The Starlette app: routes, API-key check, body-size limit, and OpenAI error bodies.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`: ApiError from the
handlers, Starlette's own 404 / 405, and (a bug) any other exception as a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kunlite.server.errors import ApiError, bad_request
from kunlite.server.openai_serving import OpenAIServing, chat_messages, decode_body
from kunlite.server.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                     TokenizeResponse, encoder)
from kunlite.server.cluster_view import cluster_view
from kunlite.server.dashboard import dashboard_routes, is_open_path
from kunlite.server.runtime import Runtime, ServeConfig

log = logging.getLogger("kunlite.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without an API key (and the dashboard's files)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`. The comparison is between SHA-256 digests in
    constant time, so that neither the key's content nor its length leaks through timing.
    /health, /metrics and the dashboard's static files are open; the dashboard's data is not."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest is not None and scope["type"] == "http" and not _is_open(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(hashlib.sha256(given).digest(), self.digest):
                err = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or is_open_path(path)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be larger than `limit` bytes (from
    Content-Length, or while reading a body that has none or lies)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(encoder.encode(obj), status_code=status, media_type="application/json")


def build_app(cfg: ServeConfig, on_fatal: Callable[[str], None] | None = None) -> Starlette:
    rt = Runtime(cfg, on_fatal)
    serving = OpenAIServing(rt)

    def require_ready() -> None:
        if rt.status != "ready":
            retry = 5.0 if rt.status == "loading" else None
            code = "model_loading" if rt.status == "loading" else "engine_unavailable"
            raise ApiError(503, rt.status_detail, code=code, retry_after=retry)

    async def body_of(request: Request) -> bytes:
        require_ready()
        return await read_body(request, cfg.max_body_bytes)

    async def completions(request: Request) -> Response:
        return await serving.completions(await body_of(request), request)

    async def chat(request: Request) -> Response:
        return await serving.chat(await body_of(request), request)

    async def models(request: Request) -> Response:
        require_ready()
        cards = [ModelCard(name, rt.created, rt.cfg.engine.model or name, rt.max_model_len) for name in rt.model_names]
        return json_response(ModelList(cards))

    async def tokenize(request: Request) -> Response:
        req: TokenizeRequest = decode_body(await body_of(request), TokenizeRequest)
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = serving.encode(req.prompt, "prompt", add_special_tokens=special)
        else:
            try:
                text = rt.tokenizer.apply_chat_template(  # type: ignore[union-attr]
                    chat_messages(req.messages or []), add_generation_prompt=req.add_generation_prompt is not False)
            except ValueError as e:
                raise bad_request(f"chat template: {e}", "messages") from None
            ids = serving.encode(text, "messages", add_special_tokens=bool(req.add_special_tokens))
        return json_response(TokenizeResponse(len(ids), rt.max_model_len, ids))

    async def detokenize(request: Request) -> Response:
        req: DetokenizeRequest = decode_body(await body_of(request), DetokenizeRequest)
        serving.check_model(req.model)
        if req.tokens and max(req.tokens) >= rt.vocab_size:
            raise bad_request(f"token ids must be below the vocabulary size {rt.vocab_size}", "tokens")
        return json_response(DetokenizeResponse(rt.tokenizer.decode(req.tokens)))  # type: ignore[union-attr]

    async def health(request: Request) -> Response:
        if rt.status != "ready":
            return ApiError(503, rt.status_detail, code=rt.status).response()
        stats = rt.metrics.stats
        states = [{"id": i.id, "state": i.state} for i in (stats.instances if stats else [])]
        if all(s["state"] == "serving" for s in states):
            return JSONResponse({"status": "ok", "instances": states})
        if not any(s["state"] == "serving" for s in states):
            return ApiError(503, "no instance of the cluster is serving", code="engine_unavailable").response()
        return JSONResponse({"status": "degraded", "instances": states})

    async def cluster(request: Request) -> Response:
        require_ready()
        return json_response(cluster_view(rt))

    async def metrics(request: Request) -> Response:
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "Not found: " + request.url.path if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal server error", code="internal_error").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start()
        yield
        await rt.shutdown()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/cluster", cluster, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *dashboard_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(ApiKeyMiddleware, api_key=cfg.api_key)],
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_bug})
    app.state.runtime = rt
    return app
