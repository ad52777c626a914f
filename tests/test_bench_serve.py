"""`python -m kunlite bench serve`: metrics, arrival processes, dataset loaders, and an
end-to-end run against a fake OpenAI-compatible streaming server (Starlette + uvicorn in a
thread), which stands in for a real server."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kunlite.bench import arrivals, cli, client, datasets, metrics, plots
from kunlite.bench.metrics import FAILED, OK, REJECTED, RequestRecord

# ---------------------------------------------------------------------------- metrics


def rec(
    i: int, ttft: float | None = None, e2e: float | None = None, out: int = 0,
    status: str = OK, itl: list[float] | None = None, prompt: int = 10,
) -> RequestRecord:
    return RequestRecord(i, arrival=0.0, prompt_len=prompt, max_tokens=out, status=status,
                         ttft=ttft, e2e=e2e, output_tokens=out, itl=itl or [])


def test_summarize_matches_linear_percentiles() -> None:
    s = metrics.summarize([i / 1000.0 for i in range(1, 101)], [50, 90, 99, 99.9])
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["p99.9"] == pytest.approx(99.901)
    assert metrics.summarize([], [50])["p50"] is None


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    assert rec(0, ttft=0.1, e2e=1.0, out=10).tpot == pytest.approx(0.1)
    assert rec(0, ttft=0.1, e2e=1.0, out=1).tpot is None
    assert rec(0, ttft=0.1, e2e=1.0, out=10, status=FAILED).tpot is None


def test_goodput_counts_completed_requests_meeting_every_slo() -> None:
    slos = metrics.parse_goodput(["ttft:200 tpot:50", "e2el:1000"])
    assert slos == {"ttft": 200.0, "tpot": 50.0, "e2el": 1000.0}
    recs = [
        rec(0, ttft=0.1, e2e=0.5, out=11),  # tpot 40 ms: good
        rec(1, ttft=0.2, e2e=0.7, out=11),  # every value exactly at its SLO: good
        rec(2, ttft=0.3, e2e=0.4, out=2),  # ttft too high
        rec(3, ttft=0.1, e2e=0.9, out=11),  # tpot 80 ms too high
        rec(4, ttft=0.1, e2e=0.1, out=1),  # one token: tpot counts as 0: good
        rec(5, ttft=0.1, e2e=1.2, out=101),  # tpot 11 ms but e2e too high
        rec(6, status=REJECTED),
        rec(7, status=FAILED),
    ]
    assert [metrics.meets_slos(r, slos) for r in recs] == [
        True, True, False, False, True, False, False, False]
    m = metrics.compute_metrics(recs, duration=2.0, percentiles=[50], slos=slos)
    assert m["request_goodput"] == pytest.approx(3 / 2.0)
    assert metrics.compute_metrics(recs, 2.0, [50])["request_goodput"] is None


def test_compute_metrics_counts_totals_and_itl() -> None:
    recs = [
        rec(0, ttft=0.1, e2e=0.4, out=4, itl=[0.1, 0.1, 0.1], prompt=5),
        rec(1, ttft=0.3, e2e=0.5, out=3, itl=[0.1, 0.1], prompt=7),
        rec(2, status=REJECTED, prompt=100),
        rec(3, status=FAILED, prompt=100),
    ]
    m = metrics.compute_metrics(recs, duration=2.0, percentiles=[50, 90])
    assert (m["completed"], m["rejected"], m["failed"]) == (2, 1, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (12, 7)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(9.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)  # 5 gaps pooled over requests
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["p90_e2el_ms"] == pytest.approx(490.0)
    report = metrics.format_report(m, [50, 90], label="x")
    assert "Serving Benchmark Result" in report and "P90 TTFT (ms):" in report


@pytest.mark.parametrize("bad", ["ttft", "foo:10", "ttft:abc", "ttft:0"])
def test_parse_goodput_rejects_bad_slos(bad: str) -> None:
    with pytest.raises(ValueError):
        metrics.parse_goodput([bad])


def test_parse_percentiles() -> None:
    assert metrics.parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    for bad in ("", "0", "100", "a"):
        with pytest.raises(ValueError):
            metrics.parse_percentiles(bad)


def test_occupancy_step_function() -> None:
    t, n = plots.occupancy([0.0, 1.0, 2.0], [2.0, 3.0, 2.5])
    # at t=2.0 one ends and one begins: the end comes first, so the count never reads 3
    assert list(zip(t.tolist(), n.tolist())) == [
        (0.0, 0), (0.0, 1), (1.0, 2), (2.0, 1), (2.0, 2), (2.5, 1), (3.0, 0)]


# ---------------------------------------------------------------------------- arrivals


def test_poisson_mean_rate_and_invariants() -> None:
    t = arrivals.gamma_arrivals(20001, 10.0, 1.0, np.random.default_rng(0))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0) and len(t) == 20001
    assert np.diff(t).mean() == pytest.approx(0.1, rel=0.03)
    again = arrivals.gamma_arrivals(20001, 10.0, 1.0, np.random.default_rng(0))
    assert np.array_equal(t, again)
    assert np.array_equal(arrivals.gamma_arrivals(5, math.inf, 1.0, np.random.default_rng(0)),
                          np.zeros(5))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness: float) -> None:
    gaps = np.diff(arrivals.gamma_arrivals(40001, 5.0, burstiness, np.random.default_rng(1)))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)  # the rate does not depend on burstiness
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_trace_replay_scaling() -> None:
    assert arrivals.trace_arrivals([100.0, 101.0, 103.0], 2.0).tolist() == [0.0, 0.5, 1.5]
    assert arrivals.trace_arrivals([5.0, 5.0, 6.0]).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        arrivals.trace_arrivals([2.0, 1.0])
    with pytest.raises(ValueError):
        arrivals.trace_arrivals([1.0], 0.0)


# ---------------------------------------------------------------------------- datasets


def tiny_tokenizer(path: Path) -> str:
    """A small byte-level BPE tokenizer.json, trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, serving llms " * 3]
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    return str(path)


def test_random_dataset_lengths_without_tokenizer() -> None:
    rng = np.random.default_rng(0)
    samples = datasets.load_random(200, 100, 20, 0.5, datasets.TextTokens(), rng)
    for s in samples:
        assert 50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30
        assert len(s.prompt.split()) == s.prompt_len  # one word ~ one token
    fixed = datasets.load_random(3, 16, 4, 0.0, datasets.TextTokens(), rng)
    assert [(s.prompt_len, s.output_len) for s in fixed] == [(16, 4)] * 3
    with pytest.raises(ValueError):
        datasets.load_random(1, 16, 4, 1.0, datasets.TextTokens(), rng)


def test_random_dataset_exact_lengths_with_tokenizer(tmp_path: Path) -> None:
    tokens = datasets.TextTokens(tiny_tokenizer(tmp_path))
    samples = datasets.load_random(30, 40, 8, 0.25, tokens, np.random.default_rng(0))
    for s in samples:
        assert tokens.count(s.prompt) == s.prompt_len
    exact = sum(s.prompt_len == n for s, n in zip(
        samples, datasets.sample_lengths(40, 0.25, 30, np.random.default_rng(0))))
    assert exact >= 28  # decode/re-encode nearly always converges to the asked length


def test_sharegpt_loader_filters_and_oversamples(tmp_path: Path) -> None:
    long = "word " * 2000
    data = [
        {"conversations": [{"from": "human", "value": "tell me a story about a cat"},
                           {"from": "gpt", "value": "once upon a time there was a cat"}]},
        {"conversations": [{"from": "system", "value": "be brief"},
                           {"from": "user", "value": "what is the capital of france"},
                           {"from": "assistant", "value": "the capital of france is paris"}]},
        {"conversations": [{"from": "human", "value": "hi"},  # prompt too short
                           {"from": "gpt", "value": "hello there how can I help you"}]},
        {"conversations": [{"from": "human", "value": long},  # prompt too long
                           {"from": "gpt", "value": "that is a lot of words"}]},
        {"conversations": [{"from": "human", "value": "no answer to this one at all"}]},
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    tokens = datasets.TextTokens()
    two = datasets.load_sharegpt(str(path), 2, tokens, np.random.default_rng(0))
    assert sorted(s.prompt for s in two) == [
        "tell me a story about a cat", "what is the capital of france"]
    by_prompt = {s.prompt: s for s in two}
    assert by_prompt["tell me a story about a cat"].output_len == math.ceil(8 * 1.3)
    five = datasets.load_sharegpt(str(path), 5, tokens, np.random.default_rng(0))
    assert len(five) == 5 and {s.prompt for s in five} == set(by_prompt)


def write_burstgpt(path: Path, rows: list[tuple[float, int, int]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Timestamp", "Model", "Request tokens", "Response tokens",
                    "Total tokens", "Log Type"])
        for ts, n_in, n_out in rows:
            w.writerow([ts, "ChatGPT", n_in, n_out, n_in + n_out, "Conversation log"])
    return str(path)


def test_burstgpt_loader(tmp_path: Path) -> None:
    path = write_burstgpt(tmp_path / "trace.csv",
                          [(5.0, 12, 3), (1.0, 8, 2), (3.0, 20, 0), (9.0, 6, 7)])
    samples = datasets.load_burstgpt(path, 10, datasets.TextTokens(), np.random.default_rng(0))
    # sorted by time, the failed row (0 response tokens) dropped
    assert [(s.timestamp, s.prompt_len, s.output_len) for s in samples] == [
        (1.0, 8, 2), (5.0, 12, 3), (9.0, 6, 7)]
    assert arrivals.trace_arrivals([s.timestamp or 0 for s in samples], 4.0).tolist() == [
        0.0, 1.0, 2.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        datasets.load_burstgpt(str(bad), 1, datasets.TextTokens(), np.random.default_rng(0))


# ---------------------------------------------------------------------------- client


def test_request_body_and_chunk_text() -> None:
    sample = datasets.Sample("hi there", 2, 5)
    chat = client.Target("http://x/v1/chat/completions", "m", True, {})
    body = client.request_body(chat, sample)
    assert body["messages"] == [{"role": "user", "content": "hi there"}]
    assert body["max_tokens"] == 5 and body["stream"] is True and "ignore_eos" not in body
    assert body["stream_options"] == {"include_usage": True}
    plain = client.Target("http://x/v1/completions", "m", False, {}, ignore_eos=True)
    assert client.request_body(plain, sample)["prompt"] == "hi there"
    assert client.request_body(plain, sample)["ignore_eos"] is True
    assert client.chunk_text({"choices": [{"delta": {"role": "assistant"}}]}, True) == ""
    assert client.chunk_text({"choices": [{"delta": {"content": "a"}}]}, True) == "a"
    assert client.chunk_text({"choices": [{"delta": {"reasoning_content": "r"}}]}, True) == "r"
    assert client.chunk_text({"choices": [{"text": "b"}]}, False) == "b"
    assert client.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, False) == ""
    assert client.error_message(b'{"error": {"message": "nope"}}') == "nope"
    assert client.error_message(b"<html>bad gateway</html>") == "<html>bad gateway</html>"
    assert client.parse_retry_after("2") == 2.0 and client.parse_retry_after(None) is None


# ---------------------------------------------------------------------------- end to end


class FakeServer:
    """An OpenAI-compatible streaming stand-in. The k-th request it receives (from 0):
    k % 5 == 4 gets a 429, k == 2 has its stream broken, k == 3 gets an error event and
    k == 6 a 500; the rest stream up to 4 one-word chunks with small sleeps."""

    def __init__(self, usage: bool = True, chunk_sleep: float = 0.01) -> None:
        self.usage = usage
        self.chunk_sleep = chunk_sleep
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def models(request: Any) -> Any:
            return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})

        async def complete(request: Any) -> Any:
            body = await request.json()
            k = len(self.bodies)
            self.bodies.append(body)
            if k % 5 == 4:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=429,
                                    headers={"Retry-After": "1"})
            if k == 6:
                return JSONResponse({"error": {"message": "internal"}}, status_code=500)
            chat = "messages" in body

            def chunk(text: str) -> str:
                choice = {"index": 0, "delta": {"content": text}} if chat else \
                    {"index": 0, "text": text}
                return "data: " + json.dumps({"choices": [choice]}) + "\n\n"

            async def stream() -> Any:
                n = min(int(body["max_tokens"]), 4)
                if chat:
                    yield "data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]})
                    yield "\n\n"
                for i in range(n):
                    await asyncio.sleep(self.chunk_sleep)
                    if k == 2 and i == 1:
                        raise RuntimeError("stream broken on purpose")
                    if k == 3 and i == 1:
                        yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                        return
                    yield chunk(f" w{i}")
                if self.usage:
                    usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(routes=[
            Route("/v1/models", models),
            Route("/v1/completions", complete, methods=["POST"]),
            Route("/v1/chat/completions", complete, methods=["POST"]),
        ])


@contextmanager
def serving(fake: FakeServer) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_end_to_end_counts_json_and_plots(tmp_path: Path, capsys: Any) -> None:
    fake = FakeServer()
    result, plot_dir = tmp_path / "result.json", tmp_path / "plots"
    with serving(fake) as url:
        rc = cli.main([
            "serve", "--base-url", url, "--num-prompts", "10", "--random-input-len", "16",
            "--random-output-len", "4", "--request-rate", "100", "--burstiness", "0.5",
            "--max-concurrency", "3", "--ignore-eos", "--goodput", "ttft:5000", "tpot:5000",
            "--result-file", str(result), "--plot", str(plot_dir), "--disable-tqdm",
            "--label", "fake", "--seed", "1",
        ])
    assert rc == 0
    out = json.loads(result.read_text())
    assert (out["completed"], out["rejected"], out["failed"]) == (5, 2, 3)
    assert out["model_id"] == "fake-model" and out["label"] == "fake"
    assert out["request_goodput"] == pytest.approx(5 / out["duration"])
    assert out["total_output_tokens"] == 20 and out["total_input_tokens"] == 35
    reqs = out["requests"]
    assert len(reqs) == 10 and [r["index"] for r in reqs] == list(range(10))
    by_status: dict[str, list[dict[str, Any]]] = {}
    for r in reqs:
        by_status.setdefault(r["status"], []).append(r)
        assert r["arrival"] <= r["start"] <= r["end"]
    for r in by_status[OK]:
        assert r["output_tokens"] == 4 and r["output_tokens_source"] == "usage"
        assert r["prompt_len"] == 7 and r["prompt_tokens_source"] == "usage"
        assert len(r["itl"]) == 3 and 0 < r["ttft"] <= r["e2e"]
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 3)
    assert all(r["retry_after"] == 1.0 and r["http_status"] == 429 for r in by_status[REJECTED])
    errors = sorted(r["error"] for r in by_status[FAILED])
    assert any("500" in e for e in errors) and any("engine died" in e for e in errors)
    assert any("RemoteProtocolError" in e or "[DONE]" in e for e in errors)
    for body in fake.bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 4
        assert body["model"] == "fake-model" and "prompt" in body
    assert (plot_dir / "ttft_cdf.png").stat().st_size > 1000
    assert (plot_dir / "timeline.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Request goodput (req/s):" in printed


def test_end_to_end_chat_without_usage_counts_chunks(tmp_path: Path) -> None:
    fake = FakeServer(usage=False)
    result = tmp_path / "r.json"
    with serving(fake) as url:
        rc = cli.main(["serve", "--base-url", url, "--backend", "openai-chat", "--model", "m",
                       "--num-prompts", "2", "--random-input-len", "8", "--random-output-len",
                       "3", "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    out = json.loads(result.read_text())
    assert out["backend"] == "openai-chat" and out["endpoint"] == "/v1/chat/completions"
    assert out["completed"] == 2 and out["failed"] == 0
    for r in out["requests"]:
        assert r["output_tokens"] == 3 and r["output_tokens_source"] == "chunks"
        assert r["prompt_tokens_source"] == "dataset" and r["prompt_len"] == 8
    assert all("messages" in b and b["model"] == "m" for b in fake.bodies)


def test_end_to_end_burstgpt_trace_replay(tmp_path: Path) -> None:
    trace = write_burstgpt(tmp_path / "t.csv", [(10.0, 5, 1), (10.5, 6, 1), (11.0, 7, 1)])
    result = tmp_path / "r.json"
    with serving(FakeServer()) as url:
        rc = cli.main(["serve", "--base-url", url, "--dataset-name", "burstgpt",
                       "--dataset-path", trace, "--num-prompts", "3", "--request-rate", "trace",
                       "--trace-time-scale", "10", "--disable-tqdm", "--result-file",
                       str(result)])
    assert rc == 0
    out = json.loads(result.read_text())
    assert [r["arrival"] for r in out["requests"]] == pytest.approx([0.0, 0.05, 0.1])
    assert out["request_rate"] == "trace" and out["completed"] == 3


def test_timeout_counts_as_failed(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    with serving(FakeServer(chunk_sleep=2.0)) as url:
        rc = cli.main(["serve", "--base-url", url, "--num-prompts", "1", "--timeout", "0.3",
                       "--random-output-len", "2", "--disable-tqdm", "--result-file",
                       str(result)])
    assert rc == 0
    out = json.loads(result.read_text())
    assert (out["completed"], out["failed"]) == (0, 1)
    assert "timed out" in out["requests"][0]["error"] and out["mean_ttft_ms"] is None


def test_unreachable_server_is_an_error(capsys: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    assert cli.main(["serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1",
                     "--disable-tqdm"]) == 1
    assert "cannot list models" in capsys.readouterr().err


def test_cli_usage_errors(capsys: Any) -> None:
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--request-rate", "trace"])  # needs burstgpt
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["serve", "--goodput", "latency:3"])


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "kunlite", "bench", "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--max-concurrency" in proc.stdout
