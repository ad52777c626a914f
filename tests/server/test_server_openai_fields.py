"""OpenAI fields that users send, through the official client and raw HTTP against a real
server: logit_bias (forcing, banning, its key and value checks), an assistant turn with
`content: null` beside `tool_calls`, and the Bearer scheme in any case."""

from __future__ import annotations

import httpx
import openai
import pytest
from serverproc import API_KEY, MODEL, ServerProcess

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def token_ids(server: ServerProcess, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=server.headers, timeout=30)
    return r.json()["tokens"]


def greedy_tokens(client: openai.OpenAI, **kwargs: object) -> list[str]:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0, **kwargs)
    return r.choices[0].logprobs.tokens


def test_logit_bias_plus_100_forces_the_token(client: openai.OpenAI, server: ServerProcess) -> None:
    [banana] = token_ids(server, " banana")
    plain = greedy_tokens(client)
    assert " banana" not in plain
    assert greedy_tokens(client, logit_bias={str(banana): 100}) == [" banana"] * 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == " banana banana"


def test_logit_bias_minus_100_bans_the_token(client: openai.OpenAI, server: ServerProcess) -> None:
    plain = greedy_tokens(client)
    [first] = token_ids(server, plain[0])
    banned = greedy_tokens(client, logit_bias={str(first): -100})
    assert banned[0] != plain[0]
    # A small bias leaves greedy output alone when it does not change the winner.
    assert greedy_tokens(client, logit_bias={str(first): 0.5}) == plain


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"-1": 1}, {"1.5": 1}, {" 1": 1}, {"": 1}, {"99999999999": 1}, {"49152": 1},
    {"1": 100.5}, {"1": -101}, {"1": "x"}, {"1": True}, {"1": None}, {"1": [1]},
    {str(i): 1 for i in range(301)},
])
def test_bad_logit_bias_gets_400_naming_it(client: openai.OpenAI, bias: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logit_bias=bias)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "logit_bias"
    assert info.value.body["type"] == "invalid_request_error"


def test_bad_logit_bias_number_beyond_float_range(server: ServerProcess) -> None:
    body = b'{"prompt": "x", "max_tokens": 1, "logit_bias": {"1": 1e400}}'
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                   headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_assistant_tool_call_turn_with_null_content(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1


@pytest.mark.parametrize("value, status", [
    (f"Bearer {API_KEY}", 200), (f"bearer {API_KEY}", 200), (f"BEARER {API_KEY}", 200), (f"BeArEr  {API_KEY}", 200),
    (f"Basic {API_KEY}", 401), (f"Bearer{API_KEY}", 401), (API_KEY, 401), (f"Bearer {API_KEY}x", 401),
])
def test_bearer_scheme_is_case_insensitive(server: ServerProcess, value: str, status: int) -> None:
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": value}, timeout=30)
    assert r.status_code == status, r.text
