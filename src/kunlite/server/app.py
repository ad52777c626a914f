"""The Starlette app: routes, API-key check, CORS, and OpenAI error bodies (the checks on a
JSON body before it is read, and its reading, are in http_guard).

Every error leaves as `{"error": {"message", "type", "param", "code"}}`: ApiError from the
handlers, Starlette's own 404 / 405, and (a bug) any other exception as a 500. A client that
went away mid-body is no error: it is counted and logged at debug level only.
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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kunlite.server.errors import ApiError, bad_request
from kunlite.server.http_guard import DISCONNECTED_STATUS, RequestTimeout, cors_middleware, read_body, require_json
from kunlite.server.openai_serving import OpenAIServing, chat_messages, decode_body
from kunlite.server.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                     TokenizeResponse, encoder)
from kunlite.engine.messages import ACCEPTING_STATES
from kunlite.server.cluster_view import cluster_view
from kunlite.server.dashboard import dashboard_routes, is_open_path
from kunlite.server.runtime import Runtime, ServeConfig

log = logging.getLogger("kunlite.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})  # answered without an API key (and the dashboard's files)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>`, the scheme in any case (RFC 7235). The keys
    are compared as SHA-256 digests in constant time, so that neither the key's content nor its
    length leaks through timing. /health, /metrics and the dashboard's static files are open;
    the dashboard's data is not."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest is not None and scope["type"] == "http" and not _is_open(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = given.partition(b" ")
            key_ok = hmac.compare_digest(hashlib.sha256(key.lstrip(b" ")).digest(), self.digest)
            if not (key_ok and scheme.lower() == b"bearer"):
                err = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or is_open_path(path)


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
        require_json(request)
        require_ready()
        return await read_body(request, cfg.max_body_bytes, cfg.timeout_body_s)

    async def completions(request: Request) -> Response:
        return await serving.completions(await body_of(request), request)

    async def chat(request: Request) -> Response:
        return await serving.chat(await body_of(request), request)

    async def models(request: Request) -> Response:
        require_ready()
        cards = [ModelCard(name, rt.created, rt.cfg.engine.model or name, rt.max_model_len) for name in rt.model_names]
        return json_response(ModelList(cards))

    def tokenize_ids(req: TokenizeRequest) -> list[int]:
        if req.prompt is not None:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            return serving.encode(req.prompt, "prompt", add_special_tokens=special)
        try:
            text = rt.tokenizer.apply_chat_template(  # type: ignore[union-attr]
                chat_messages(req.messages or []), add_generation_prompt=req.add_generation_prompt is not False)
        except ValueError as e:
            raise bad_request(f"chat template: {e}", "messages") from None
        return serving.encode(text, "messages", add_special_tokens=bool(req.add_special_tokens))

    async def tokenize(request: Request) -> Response:
        body = await body_of(request)
        req: TokenizeRequest = decode_body(body, TokenizeRequest)
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        ids = await serving.off_loop(len(body), tokenize_ids, req)
        return json_response(TokenizeResponse(len(ids), rt.max_model_len, ids))

    async def detokenize(request: Request) -> Response:
        body = await body_of(request)
        req: DetokenizeRequest = decode_body(body, DetokenizeRequest)
        serving.check_model(req.model)
        if req.tokens and max(req.tokens) >= rt.vocab_size:
            raise bad_request(f"token ids must be below the vocabulary size {rt.vocab_size}", "tokens")
        text = await serving.off_loop(len(body), rt.tokenizer.decode, req.tokens)  # type: ignore[union-attr]
        return json_response(DetokenizeResponse(text))

    async def health(request: Request) -> Response:
        if rt.status != "ready":
            return ApiError(503, rt.status_detail, code=rt.status).response()
        stats = rt.metrics.stats
        states = [{"id": i.id, "state": i.state} for i in (stats.instances if stats else [])]
        if all(s["state"] in ACCEPTING_STATES for s in states):
            return JSONResponse({"status": "ok", "instances": states})
        if not any(s["state"] in ACCEPTING_STATES for s in states):
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

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        rt.metrics.aborted("client_disconnect")
        log.debug("%s %s: the client went away while sending its body", request.method, request.url.path)
        return Response(status_code=DISCONNECTED_STATUS)

    async def on_body_timeout(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestTimeout)
        rt.metrics.aborted("body_timeout")
        log.debug("%s %s: %s", request.method, request.url.path, exc.message)
        return exc.response()

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
    # CORS outside the key check: a browser's preflight carries no key.
    middleware = [*cors_middleware(cfg.allowed_origins), Middleware(ApiKeyMiddleware, api_key=cfg.api_key)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_client_gone, RequestTimeout: on_body_timeout,
                                        Exception: on_bug})
    app.state.runtime = rt
    return app
