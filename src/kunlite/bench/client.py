"""The HTTP side of `bench serve`: one streaming request to an OpenAI-compatible server.

The client parses the SSE itself and times each chunk that carries text. A 429 is a
rejection; any other non-200, an error event, bad data, or a stream that ends before
`[DONE]` is a failure. See `metrics.py` for how the times become metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from kunlite.bench.datasets import Sample, TextTokens
from kunlite.bench.metrics import FAILED, OK, REJECTED, RequestRecord

DEFAULT_TIMEOUT_S = 6 * 60 * 60  # vLLM's per-request limit: a benchmark may be slow, not hung


@dataclass(frozen=True)
class Target:
    url: str  # the full endpoint URL
    model: str
    chat: bool  # /v1/chat/completions body and deltas, else /v1/completions
    headers: dict[str, str]
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = DEFAULT_TIMEOUT_S  # seconds, the whole request including its stream


class StreamFailure(Exception):
    """The stream said or did something that makes the request a failure."""


def request_body(target: Target, sample: Sample) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": sample.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.chat:
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    if target.ignore_eos:
        body["ignore_eos"] = True  # an extension that vLLM and kunlite accept
    return body


def chunk_text(obj: dict[str, Any], chat: bool) -> str:
    """The generated text one SSE chunk carries ("" for role-only, usage-only, ... chunks)."""
    parts: list[str] = []
    for choice in obj.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content")
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            parts.append(text)
    return "".join(parts)


def error_message(payload: bytes) -> str:
    """The OpenAI error body's message, else the start of the body."""
    try:
        obj = json.loads(payload)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)
    except ValueError:
        pass
    return payload[:500].decode("utf-8", "replace")


def parse_retry_after(value: str | None) -> float | str | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value  # an HTTP date, kept as sent


async def send_request(
    client: httpx.AsyncClient,
    target: Target,
    sample: Sample,
    rec: RequestRecord,
    t0: float,
    tokens: TextTokens,
) -> None:
    """Send one request and fill `rec`; it raises nothing but cancellation."""
    started = time.perf_counter()
    rec.start = started - t0
    texts: list[str] = []
    stamps: list[float] = []  # perf_counter() of each text-carrying chunk, in order
    usage: dict[str, Any] | None = None
    try:
        async with client.stream(
            "POST", target.url, json=request_body(target, sample), headers=target.headers
        ) as resp:
            rec.http_status = resp.status_code
            if resp.status_code != 200:
                msg = error_message(await resp.aread())
                rec.status = REJECTED if resp.status_code == 429 else FAILED
                rec.retry_after = parse_retry_after(resp.headers.get("retry-after"))
                rec.error = f"HTTP {resp.status_code}: {msg}"
                return
            done, event = False, ""
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line:
                    event = ""  # a blank line ends an SSE event
                    continue
                if line.startswith("event:"):
                    event = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue  # comments (":") and fields we do not use
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise StreamFailure(f"bad SSE data: {data[:200]!r}")
                if event == "error" or obj.get("error"):
                    raise StreamFailure(f"error event: {error_message(data.encode())}")
                text = chunk_text(obj, target.chat)
                if text:
                    texts.append(text)
                    stamps.append(now)
                if obj.get("usage"):
                    usage = obj["usage"]
            if not done:
                raise StreamFailure("stream ended before [DONE]")
        ended = time.perf_counter()
    except StreamFailure as e:
        rec.status, rec.error = FAILED, str(e)
        return
    except (httpx.HTTPError, OSError) as e:
        rec.status, rec.error = FAILED, f"{type(e).__name__}: {e}"
        return
    finally:
        rec.end = time.perf_counter() - t0
    rec.status = OK
    rec.e2e = ended - started
    # No text at all (e.g. an immediate EOS): the response was complete, and first, at the end.
    rec.ttft = stamps[0] - started if stamps else rec.e2e
    rec.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    if usage and isinstance(usage.get("prompt_tokens"), int):
        rec.prompt_len, rec.prompt_tokens_source = usage["prompt_tokens"], "usage"
    if usage and isinstance(usage.get("completion_tokens"), int):
        rec.output_tokens, rec.output_tokens_source = usage["completion_tokens"], "usage"
    elif tokens.exact:
        rec.output_tokens, rec.output_tokens_source = tokens.count("".join(texts)), "tokenizer"
    else:
        rec.output_tokens, rec.output_tokens_source = len(stamps), "chunks"
