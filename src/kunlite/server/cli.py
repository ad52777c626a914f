"""python -m kunlite serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K]
[--served-model-name N ...] [--allowed-origins O ...] [--timeout-headers S] [--timeout-body S]
[admission flags] [engine flags]"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from kunlite.config import ConfigError, parse_size
from kunlite.engine.args import add_engine_args, check_port_free, options_from_args
from kunlite.server.admission import POLICIES
from kunlite.server.runtime import ServeConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _origin(text: str) -> str:
    """A web origin as browsers send it (lowercase, no path, no trailing slash), or *."""
    if text == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", text.lower()):
        return text.lower()
    raise argparse.ArgumentTypeError(f"an origin is scheme://host[:port], without a path, or *; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kunlite serve",
                                description="Serve a model behind an OpenAI-compatible HTTP API.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("KUNLITE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint but /health and /metrics "
                        "(default: $KUNLITE_API_KEY, else no key)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) clients may use; the first one is listed first and "
                        "labels the metrics (default: the model's directory name, or --model as given)")
    g.add_argument("--max-request-body", default="8MiB", help="larger bodies get 413 (default: 8MiB)")
    g.add_argument("--allowed-origins", nargs="+", type=_origin, default=(), metavar="ORIGIN",
                   help="web origins (https://app.example:8080, or *) whose pages may call the API: CORS "
                        "for them (default: none, no CORS headers)")
    g.add_argument("--timeout-headers", type=_positive_float, default=10.0, metavar="S",
                   help="a request's headers must arrive within S seconds of its first byte (of the "
                        "connection, for its first request); else 408 and the connection is closed (default: 10)")
    g.add_argument("--timeout-body", type=_positive_float, default=60.0, metavar="S",
                   help="a request's body must arrive within S seconds of its headers; else 408 and the "
                        "connection is closed (default: 60)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per HTTP request")
    g.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the engine's warm-up requests before it reports ready")
    a = p.add_argument_group("admission")
    a.add_argument("--admission", default="fcfs", choices=POLICIES,
                   help="fcfs: queue everything; reject: 429 for a request predicted to miss the SLO; "
                        "priority: like reject, with the queue ordered by the request's `priority`")
    a.add_argument("--slo-ttft-ms", type=_positive_float, default=None, help="time-to-first-token SLO")
    a.add_argument("--slo-tpot-ms", type=_positive_float, default=None, help="time-per-output-token SLO")
    a.add_argument("--max-queued-requests", type=_positive_int, default=None,
                   help="429 when this many requests are waiting for their first token")
    a.add_argument("--max-queued-tokens", type=_positive_int, default=None,
                   help="429 when the waiting prompts would exceed this many tokens")
    add_engine_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        engine=options_from_args(args), served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or None, max_body_bytes=parse_size(args.max_request_body),
        allowed_origins=tuple(args.allowed_origins), timeout_headers_s=args.timeout_headers,
        timeout_body_s=args.timeout_body,
        admission=args.admission, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        warmup=args.warmup)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        cfg.engine.check_cluster()
        check_port_free(args.host, args.port, "--port")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from kunlite.server.app import build_app
    from kunlite.server.http_timeouts import h11_protocol_with_header_timeout

    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = build_app(cfg, on_fatal=on_fatal)
    metrics = app.state.runtime.metrics
    http = h11_protocol_with_header_timeout(cfg.timeout_headers_s, on_timeout=lambda: metrics.aborted("header_timeout"))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=http,
                            access_log=args.access_log, timeout_graceful_shutdown=5, log_config=None)
    server = uvicorn.Server(config)
    server.run()
    if fatal:
        print(f"error: {fatal[0]}", file=sys.stderr)
        return 1
    return 0
