"""The front end against careless and hostile HTTP clients, over real sockets: content types a
browser can send cross-origin without a preflight (415), CORS for --allowed-origins only,
clients that vanish mid-body (counted, never logged as errors), and clients too slow with
their headers or body (408, then the connection is closed)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from serverproc import API_KEY, MODEL, ServerProcess
from test_server_http import assert_error

ALLOWED = "http://allowed.example:5173"
TIMEOUT_S = 1.0  # --timeout-headers and --timeout-body of the guarded server
BODY = json.dumps({"model": MODEL, "prompt": "Hello"}).encode()


@pytest.fixture(scope="module")
def guarded(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory("--allowed-origins", ALLOWED, "--timeout-headers", str(TIMEOUT_S),
                          "--timeout-body", str(TIMEOUT_S))


@pytest.fixture(scope="module")
def http(guarded: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, headers=guarded.headers, timeout=60) as client:
        yield client


def aborted(server: ServerProcess, reason: str) -> float:
    return server.metrics().get(f'kunlite:requests_aborted_total{{reason="{reason}"}}', 0.0)


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # a byte sent after the server closed: what came before is all there is
        pass
    return data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def request_head(path: str, content_length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode()


def openai_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---------------------------------------------------------------------------- content type


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_body_declared_as_not_json_gets_415(http: httpx.Client, path: str, content_type: str) -> None:
    err = assert_error(http.post(path, content=BODY, headers={"Content-Type": content_type}), 415)
    assert err["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_served(http: httpx.Client, content_type: str) -> None:
    r = http.post("/tokenize", content=BODY, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


def test_no_content_type_is_json_unless_a_browser_sent_it(http: httpx.Client) -> None:
    r = http.post("/tokenize", content=BODY)  # raw bytes: httpx sends no Content-Type, as curl --data-binary
    assert "content-type" not in r.request.headers and r.status_code == 200
    # fetch(url, {method: "POST", body: blob}) from any page: no Content-Type, no preflight, an Origin
    assert_error(http.post("/tokenize", content=BODY, headers={"Origin": "http://evil.example"}), 415)


# ---------------------------------------------------------------------------- CORS


def preflight(server: ServerProcess, origin: str) -> httpx.Response:
    return httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"})


def test_preflight_from_an_allowed_origin(guarded: ServerProcess, http: httpx.Client) -> None:
    r = preflight(guarded, ALLOWED)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed_headers = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-lang"} <= allowed_headers
    assert "Origin" in r.headers["vary"]
    # ... and the request that follows it is readable by that page.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = http.post("/v1/chat/completions", json=body, headers={"Origin": ALLOWED})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert r.headers["access-control-expose-headers"] == "Retry-After"


def test_preflight_from_another_origin_is_refused(guarded: ServerProcess, http: httpx.Client) -> None:
    r = preflight(guarded, "http://evil.example")
    err = assert_error(r, 400)
    assert err["code"] == "cors_preflight_refused"
    assert "access-control-allow-origin" not in r.headers
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_no_cors_headers_without_allowed_origins(server: ServerProcess) -> None:
    r = preflight(server, ALLOWED)
    assert r.status_code >= 400
    assert not any(name.startswith("access-control-") for name in r.headers)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60,
                   headers={**server.headers, "Origin": ALLOWED})
    assert r.status_code == 200
    assert not any(name.startswith("access-control-") for name in r.headers)


@pytest.mark.parametrize("origin", ["localhost:5173", "http://localhost:5173/", "http://x.example/app"])
def test_an_origin_that_no_browser_sends_is_refused_at_start(origin: str) -> None:
    """A path or a missing scheme would never match an Origin header: say so, do not start."""
    done = subprocess.run([sys.executable, "-m", "kunlite", "serve", "--port", "0", "--allowed-origins", origin],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "scheme://host[:port]" in done.stderr


# ---------------------------------------------------------------------------- vanishing clients


def poll(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_clients_vanishing_mid_body_are_counted_not_logged(guarded: ServerProcess) -> None:
    before = aborted(guarded, "client_disconnect")
    log_before = len(guarded.log())
    for _ in range(20):
        with connect(guarded) as sock:
            sock.sendall(request_head("/v1/completions", 1000) + b'{"prompt": "' + b"a" * 100)
    assert poll(lambda: aborted(guarded, "client_disconnect") - before >= 20)
    assert aborted(guarded, "client_disconnect") - before == 20
    new_log = guarded.log()[log_before:]
    assert "Traceback" not in new_log and "Exception in ASGI" not in new_log
    assert not re.search(r" (ERROR|WARNING) ", new_log), new_log
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200


# ---------------------------------------------------------------------------- slow clients


def test_a_lying_content_length_is_closed_within_the_timeout(guarded: ServerProcess) -> None:
    before = aborted(guarded, "body_timeout")
    with connect(guarded) as sock:
        sock.sendall(request_head("/v1/completions", 100) + b'{"prompt": "')  # and nothing more
        start = time.monotonic()
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - start
    err = openai_error(raw, 408)
    assert err["code"] == "request_timeout"
    assert b"\r\nconnection: close\r\n" in raw.lower()
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3.0
    assert aborted(guarded, "body_timeout") == before + 1


def test_headers_sent_a_byte_at_a_time_are_cut_off(guarded: ServerProcess) -> None:
    before = aborted(guarded, "header_timeout")
    head = request_head("/v1/completions", len(BODY))
    with connect(guarded) as sock:
        stop = threading.Event()

        def drip() -> None:  # one byte every 50 ms: the whole head would take ~7 s
            for byte in head:
                if stop.wait(0.05):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:  # the server closed the connection
                    return

        start = time.monotonic()
        dripper = threading.Thread(target=drip)
        dripper.start()
        try:
            raw = read_until_closed(sock)
        finally:
            stop.set()
            dripper.join()
        elapsed = time.monotonic() - start
    assert openai_error(raw, 408)["code"] == "request_timeout"
    assert elapsed < TIMEOUT_S + 3.0
    assert aborted(guarded, "header_timeout") == before + 1


def test_a_connection_that_sends_nothing_is_closed(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - start < TIMEOUT_S + 3.0


def test_keep_alive_requests_each_get_their_own_header_deadline(guarded: ServerProcess) -> None:
    """Three requests on one connection, each started after more than the timeout since the
    connection was made; each is served."""
    with connect(guarded) as sock:
        for _ in range(3):
            deadline = time.monotonic() + TIMEOUT_S * 0.7
            sock.sendall(request_head("/tokenize", len(BODY)) + BODY)
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["count"] > 0, head
            while time.monotonic() < deadline:  # idle, under the keep-alive timeout
                time.sleep(0.05)
