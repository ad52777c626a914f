"""Cancellation: clients that go away mid-stream get their requests aborted and their KV
freed. A storm of 50 streaming clients cut off after their first chunks must leave nothing
running or waiting and the KV cache empty."""

from __future__ import annotations

import asyncio
import json

import httpx
from serverproc import MODEL, ServerProcess, wait_idle

STORM = 50


async def stream_and_cut(client: httpx.AsyncClient, server: ServerProcess, i: int, keep: int) -> int:
    """Open a stream, read `keep` data events, then drop the connection."""
    body = {"model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 64, "ignore_eos": True,
            "stream": True}
    if i % 2:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story {i}"}], "max_tokens": 64,
                "ignore_eos": True, "stream": True}
    path = "/v1/chat/completions" if i % 2 else "/v1/completions"
    seen = 0
    async with client.stream("POST", server.url + path, json=body, headers=server.headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the stream ended before it was cut"
                json.loads(line[6:])
                seen += 1
                if seen >= keep:
                    break
    return seen  # leaving the block closes the connection mid-stream


def test_disconnect_storm_frees_everything(server: ServerProcess) -> None:
    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=STORM + 5, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*[stream_and_cut(client, server, i, 1 + i % 3) for i in range(STORM)])

    seen = asyncio.run(storm())
    assert len(seen) == STORM and all(s >= 1 for s in seen)
    m = wait_idle(server, timeout=30)
    assert m["kunlite:kv_cache_usage_perc"] == 0
    assert m["kunlite:num_requests_running"] == 0
    assert m["kunlite:num_requests_waiting"] == 0
    # The cut requests were aborted, not run to their 64 tokens.
    assert m['kunlite:request_success_total{finished_reason="abort"}'] >= STORM
    assert m["kunlite:generation_tokens_total"] < STORM * 64
    # ... and the server still serves.
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                   headers=server.headers, timeout=60)
    assert r.status_code == 200


def test_cut_before_the_first_token(server: ServerProcess) -> None:
    """Clients that give up while their requests are still queued behind others."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(i: int) -> None:
                body = {"model": MODEL, "prompt": "word " * 300 + str(i), "max_tokens": 32, "stream": i % 2 == 0}
                try:
                    await asyncio.wait_for(client.post(server.url + "/v1/completions", json=body,
                                                       headers=server.headers), timeout=0.3)
                except asyncio.TimeoutError:
                    pass
            await asyncio.gather(*[one(i) for i in range(12)])

    asyncio.run(run())
    m = wait_idle(server, timeout=30)
    assert m["kunlite:kv_cache_usage_perc"] == 0
    assert m["kunlite:num_requests_running"] == 0 and m["kunlite:num_requests_waiting"] == 0
