"""Raw HTTP against a real server: SSE framing, [DONE], the usage chunk, error bodies and
statuses, the side endpoints, and the metrics' names."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverproc import MODEL, ServerProcess, wait_idle


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "any":
        assert err["param"] == param
    return err


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each event; checks the framing on the way."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            assert field in ("event", "data"), line
            if field == "event":
                name = value
            else:
                data = value
        assert data is not None
        events.append((name, data))
    return events


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0}),
])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sse_framing_done_and_usage(http: httpx.Client, path: str, body: dict, include_usage: bool) -> None:
    body = {**body, "model": MODEL, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = http.post(path, json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.content)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    kind = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    if include_usage:
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
        assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
        chunks = chunks[:-1]
    assert all(c.get("usage") is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_non_streamed_body_has_every_field(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 3})
    body = r.json()
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(body)
    choice = body["choices"][0]
    assert {"index", "message", "logprobs", "finish_reason"} <= set(choice)
    assert choice["message"]["role"] == "assistant"
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_error_bodies(http: httpx.Client, server: ServerProcess) -> None:
    post = http.post
    assert_error(post("/v1/completions", content=b"{not json"), 400)
    assert_error(post("/v1/completions", content=b"\xff\xfe\x00"), 400)
    assert_error(post("/v1/completions", json={"prompt": "x", "max_tokens": "3"}), 400, "max_tokens")
    assert_error(post("/v1/completions", json={"prompt": "x", "max_tokens": 2**70}), 400, "max_tokens")
    assert_error(post("/v1/completions", content=b'{"prompt": "x", "temperature": 1e400}'), 400, "temperature")
    assert_error(post("/v1/completions", json={"max_tokens": 3}), 400, "prompt")
    assert_error(post("/v1/completions", json={"prompt": [1, "a"]}), 400, "prompt")
    assert_error(post("/v1/completions", json={"prompt": [10**9]}), 400)
    assert_error(post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400,
                 "messages[0].role")
    assert_error(post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
    assert_error(post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404, "model")
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x"}), 401)
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)


def test_stream_errors_before_the_first_token_are_plain_errors(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "", "stream": True})
    assert_error(r, 400, "prompt")


def test_text_too_long_for_the_context_is_refused_before_tokenizing(http: httpx.Client) -> None:
    start = time.perf_counter()
    r = http.post("/v1/completions", json={"prompt": "\u4e2d" * 2_000_000, "max_tokens": 1})
    err = assert_error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < 2.0  # tokenizing it would hold the event loop for ~5 s


def test_oversized_body_gets_413(server: ServerProcess, http: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    assert_error(http.post("/v1/completions", content=big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks()), 413)
    assert http.get("/health").status_code == 200


def test_health_is_503_until_the_model_is_loaded(server: ServerProcess) -> None:
    # The HTTP server answers within a second of starting; loading the model takes longer.
    assert 503 in server.health_seen and server.health_seen[-1] == 200
    assert set(server.health_seen) == {503, 200}
    assert "KV capacity" in server.log()


def test_health_metrics_and_models_need_no_key_where_they_should(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # and the instances' states
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    # The dashboard's page and files are open; its data (/v1/cluster) is not.
    assert httpx.get(server.url + "/dashboard").status_code == 200
    assert httpx.get(server.url + "/dashboard/static/dashboard.css").status_code == 200
    assert httpx.get(server.url + "/v1/cluster").status_code == 401


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}]}).json()
    assert chat["count"] > tok["count"]
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400)
    assert_error(http.post("/tokenize", json={}), 400)


def test_usage_counts_prompt_tokens_like_tokenize(http: httpx.Client) -> None:
    tok = http.post("/tokenize", json={"prompt": "Count these tokens"}).json()
    r = http.post("/v1/completions", json={"prompt": "Count these tokens", "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == tok["count"]
    by_ids = http.post("/v1/completions", json={"prompt": tok["tokens"], "max_tokens": 1}).json()
    assert by_ids["usage"]["prompt_tokens"] == tok["count"]


def test_non_streamed_request_is_aborted_when_the_client_leaves(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=2.0)
    m = wait_idle(server, timeout=10)
    assert m["kunlite:num_requests_running"] == 0 and m["kunlite:kv_cache_usage_perc"] == 0


METRIC_NAMES = [
    "kunlite:time_to_first_token_seconds_bucket", "kunlite:inter_token_latency_seconds_bucket",
    "kunlite:e2e_request_latency_seconds_bucket", "kunlite:request_queue_time_seconds_bucket",
    "kunlite:num_requests_running", "kunlite:num_requests_waiting", "kunlite:kv_cache_usage_perc",
    "kunlite:request_time_per_output_token_seconds_bucket",
    "kunlite:num_preemptions_total", "kunlite:prompt_tokens_total", "kunlite:generation_tokens_total",
    "kunlite:request_success_total", "kunlite:requests_rejected_total",
]


def test_metrics_names(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    text = http.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}{{" in text, name
    # Every finish and rejection reason has a series from the start (at 0 until it happens).
    assert 'finished_reason="length"' in text and 'finished_reason="abort"' in text
    assert 'reason="queue_requests"' in text
    assert f'model_name="{MODEL}"' in text


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_bench_serve_runs_against_the_server(server: ServerProcess, smollm2: Path, tmp_path: Path,
                                             backend: str) -> None:
    from kunlite.bench import serve as bench

    result = tmp_path / "bench.json"
    rc = bench.main(["--base-url", server.url, "--api-key", server.api_key or "", "--backend", backend,
                     "--tokenizer", str(smollm2), "--num-prompts", "4", "--random-input-len", "32",
                     "--random-output-len", "4", "--ignore-eos", "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    out = json.loads(result.read_text())
    assert out["completed"] == 4 and out["model_id"] == MODEL
    assert all(r["output_tokens"] == 4 for r in out["requests"])
