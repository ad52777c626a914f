"""Tokenizing never stalls the event loop: while one request of 251 prompts x 31,000
characters (7.8 MB, under the body limit) is tokenized and refused, /health, asked over and
over from another client, answers in under half a second."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import httpx
from serverproc import MODEL, ServerProcess

from kunlite.engine.tokenizer import Tokenizer

NUM_PROMPTS, PROMPT_CHARS = 251, 31_000
HEALTH_LIMIT_S = 0.5


def attack_body(model_dir: Path) -> bytes:
    """250 prompts of ~5,300 tokens each (of one-token words: they fit the 8,192-token context)
    and a last one of 31,000 digits (one token each: too long), so that all are tokenized
    before the request is refused; no character bound can tell them apart beforehand."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    vocab = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    words = sorted({v[1:] for v in vocab if re.fullmatch(r"Ġ[a-z]{3,6}", v)})
    rng = random.Random(14)
    prompts = [" ".join(rng.choices(words, k=PROMPT_CHARS // 4))[:PROMPT_CHARS] for _ in range(NUM_PROMPTS - 1)]
    prompts.append("7" * PROMPT_CHARS)
    return json.dumps({"model": MODEL, "prompt": prompts, "max_tokens": 1}).encode()


def test_health_answers_while_a_huge_request_is_tokenized(server: ServerProcess, smollm2: Path) -> None:
    body = attack_body(smollm2)
    assert 7_500_000 < len(body) < 8 << 20
    result: list[httpx.Response] = []
    sent = threading.Event()

    def attack() -> None:
        def chunks():  # type: ignore[no-untyped-def]
            yield body
            sent.set()  # the whole body is in the socket: the server is reading or tokenizing it

        headers = {**server.headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
        result.append(httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=300))

    attacker = threading.Thread(target=attack)
    attacker.start()
    assert sent.wait(60)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        while attacker.is_alive():
            start = time.perf_counter()
            assert probe.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
    attacker.join()
    [r] = result
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert max(latencies) < HEALTH_LIMIT_S, sorted(latencies)[-5:]
    assert len(latencies) >= 10, latencies  # the probes overlapped the tokenizing
