"""SLO-aware admission on a live server under `--admission reject`: a burst beyond capacity
gets quick 429s with Retry-After, and the admitted requests meet the TTFT SLO.

The machine is shared (two cores, other processes), so step times vary: the test allows
TTFT_MARGIN_S of client-side slack over the SLO, and a few admitted requests may be shed at
their deadline (a 429 "deadline_exceeded", which is how the server keeps its SLO when a
prediction was too optimistic), but not many: admission calibrates its predictions against the
TTFTs it measured (the warm-up burst's among them), so a request the machine's slowness would
push past the SLO is mostly rejected up front."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from serverproc import API_KEY, MODEL, ServerProcess

SLO_MS = 2000
TTFT_MARGIN_S = 0.3  # HTTP and event-loop slack on a busy two-core machine
QUICK_429_S = 0.5
MAX_TOKENS = 8
WORDS = "apple river stone cloud green music table light paper window garden silver".split()


@pytest.fixture(scope="module")
def reject_server(server_factory) -> ServerProcess:  # type: ignore[no-untyped-def]
    return server_factory("--admission", "reject", "--slo-ttft-ms", str(SLO_MS), "--max-num-seqs", "4",
                          "--max-queued-tokens", "2048")


@dataclass
class Outcome:
    status: int
    headers_s: float  # time to the response headers
    ttft_s: float | None  # time to the first text (200 only)
    retry_after: str | None
    code: str | None


async def one(client: httpx.AsyncClient, server: ServerProcess, prompt: str) -> Outcome:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    async with client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as r:
        headers_s = time.perf_counter() - start
        if r.status_code != 200:
            err = (await r.aread()).decode()
            code = httpx.Response(200, content=err).json()["error"]["code"]
            return Outcome(r.status_code, headers_s, None, r.headers.get("retry-after"), code)
        ttft = None
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text":""' not in line:
                ttft = time.perf_counter() - start
        return Outcome(200, headers_s, ttft, None, None)


def burst(server: ServerProcess, n: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(n)]  # no shared prefixes

    async def run() -> list[Outcome]:
        limits = httpx.Limits(max_connections=n + 5)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*[one(client, server, p) for p in prompts])

    return asyncio.run(run())


def test_burst_beyond_capacity_is_rejected_quickly_and_admitted_requests_meet_the_slo(
        reject_server: ServerProcess) -> None:
    burst(reject_server, 24, seed=1)  # warm-up: the cost model and the calibration see this load
    time.sleep(1.0)
    outcomes = burst(reject_server, 24, seed=2)

    admitted = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status == 429 and o.code == "slo_ttft"]
    shed = [o for o in outcomes if o.status == 429 and o.code == "deadline_exceeded"]
    assert len(admitted) + len(rejected) + len(shed) == len(outcomes), outcomes
    assert admitted and rejected, outcomes

    for o in rejected:
        assert o.headers_s < QUICK_429_S, o
        assert o.retry_after is not None and int(o.retry_after) >= 1
    for o in admitted:
        assert o.ttft_s is not None and o.ttft_s <= SLO_MS / 1e3 + TTFT_MARGIN_S, o
    assert len(shed) <= max(1, len(admitted) // 3), outcomes

    m = reject_server.metrics()
    assert m['kunlite:requests_rejected_total{reason="slo_ttft"}'] >= len(rejected)
    assert 1.0 <= m["kunlite:ttft_calibration_factor"] <= 4.0


def test_queue_token_cap_raises_rate_limit_error(reject_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=reject_server.url + "/v1", api_key=API_KEY, max_retries=0)
    prompt = list(range(1000, 3100))  # 2100 prompt tokens, over --max-queued-tokens 2048
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert info.value.status_code == 429
    assert info.value.body["code"] == "queue_tokens"
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_priority_orders_the_queue(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Under `priority`, a request with a lower `priority` value jumps the queued ones."""
    server = server_factory("--admission", "priority", "--slo-ttft-ms", "60000", "--max-num-seqs", "2")

    async def timed(client: httpx.AsyncClient, prompt: str, priority: int, delay: float) -> float:
        await asyncio.sleep(delay)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "priority": priority}
        start = time.perf_counter()
        r = await client.post(server.url + "/v1/completions", json=body, headers=server.headers)
        assert r.status_code == 200, r.text
        return time.perf_counter() - start + delay  # finish time, from the burst's start

    async def run() -> tuple[list[float], float]:
        async with httpx.AsyncClient(timeout=120) as client:
            lows = [timed(client, f"low {i}: " + " ".join(WORDS), 10, 0.0) for i in range(6)]
            high = timed(client, "high: " + " ".join(WORDS), 0, 0.3)
            *low_done, high_done = await asyncio.gather(*lows, high)
            return low_done, high_done

    low_done, high_done = asyncio.run(run())
    # Two lows run at a time; the high one arrives while two wait, and takes the next free seat
    # beside one of them: it finishes with the fifth low, before the sixth. In FCFS order it
    # would run last, alone, after all six (checked: it fails under --admission fcfs). It used
    # to be asserted to finish before the fifth, its seat-mate: a tie decided by a few ms.
    assert high_done < sorted(low_done)[-1], (high_done, sorted(low_done))
