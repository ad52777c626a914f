"""A dead engine worker: in-flight streams end with an error event and [DONE], other requests
get 503 with the OpenAI error body, /health says 503, and the server process stays up."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
from serverproc import MODEL, ServerProcess


def test_worker_death_ends_requests_cleanly(server: ServerProcess) -> None:
    headers = server.headers
    stream_events: list[str] = []
    blocking: list[httpx.Response] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    stream_events.append(line)
                    started.set()

    def plain() -> None:
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True}
        blocking.append(httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    assert started.wait(60)
    time.sleep(0.5)
    os.kill(server.worker_pid(), signal.SIGKILL)
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a request hung after the worker died"

    assert stream_events[-1] == "data: [DONE]"
    assert stream_events[-3] == "event: error"
    error = json.loads(stream_events[-2].removeprefix("data: "))["error"]
    assert "engine unavailable" in error["message"]

    [resp] = blocking
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "engine_unavailable"

    assert server.proc.poll() is None  # the server is still up ...
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and set(health.json()["error"]) == {"message", "type", "param", "code"}
    after = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                       headers=headers, timeout=10)
    assert after.status_code == 503  # ... and says why it cannot serve
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
