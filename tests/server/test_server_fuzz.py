"""Hostile bodies from Hypothesis against the two generation endpoints.

Each body carries at least one thing that makes it invalid (a wrong type, a number out of
range or beyond 64 bits, deep nesting in a typed field, invalid UTF-8, a prompt longer than
the context, a wrong top-level type, or bytes that are not JSON), mixed with random other
fields. Every one must get a 4xx with the OpenAI error body, none a 5xx, and the server must
keep serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverproc import MODEL, ServerProcess

COMPLETION_BASE = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
CHAT_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
not_a_number = st.text(max_size=8) | st.lists(json_leaf, max_size=3) | st.dictionaries(st.text(max_size=4), json_leaf,
                                                                                       max_size=2) | st.booleans()
beyond_64_bits = st.integers(min_value=2**64) | st.integers(max_value=-(2**64))

# field -> (lowest valid, highest valid); an invalid value lies outside. top_p and
# repetition_penalty must be > 0: for them the lowest valid value is excluded too.
NUMERIC_RANGES = {
    "n": (1, 128), "max_tokens": (1, 8191), "temperature": (0.0, 100.0), "top_p": (0.0, 1.0),
    "top_k": (-1, 2**31 - 1), "min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0), "repetition_penalty": (0.0, 10.0), "min_tokens": (0, 2**31 - 1),
    "seed": (-(2**63), 2**63 - 1), "priority": (-(2**31), 2**31 - 1),
}
EXCLUSIVE_LOW = {"top_p", "repetition_penalty"}


@st.composite
def bad_number(draw: st.DrawFn) -> tuple[str, object]:
    """A numeric field and a value that is certainly invalid for it."""
    field = draw(st.sampled_from(sorted(NUMERIC_RANGES)))
    lo, hi = NUMERIC_RANGES[field]
    if isinstance(lo, int):
        out_of_range = st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1) | beyond_64_bits
    else:
        out_of_range = (st.floats(max_value=lo, exclude_max=field not in EXCLUSIVE_LOW, min_value=-1e300)
                        | st.floats(min_value=hi, exclude_min=True, max_value=1e300))
    return field, draw(out_of_range | not_a_number)


common_bad_fields = st.one_of(
    bad_number(),
    st.tuples(st.just("stop"), st.integers() | st.lists(st.integers(), min_size=1) | st.just("") | st.just([""])
              | st.lists(st.text(min_size=1), min_size=17, max_size=20)),
    st.tuples(st.just("stop_token_ids"), st.lists(st.integers(max_value=-1) | st.text(), min_size=1)),
    st.tuples(st.sampled_from(["stream", "ignore_eos", "skip_special_tokens"]), st.integers() | st.text()),
    st.tuples(st.just("stream_options"), st.text() | st.lists(json_leaf, max_size=2) | st.just({"include_usage": 3})),
    st.tuples(st.just("model"), st.text(max_size=30).filter(lambda m: m != MODEL) | st.integers()),
    st.tuples(st.just("logit_bias"), st.sampled_from([{"1": 500.0}, {"x": 1.0}, {"1": "a"}, {"-3": 1.0}, {"1": True}])),
)
completion_bad_fields = st.one_of(
    common_bad_fields,
    st.tuples(st.just("prompt"), st.just("") | st.just([]) | st.integers() | st.booleans() | st.floats()
              | st.lists(st.integers(min_value=200_000, max_value=2**31 - 1), min_size=1, max_size=3)
              | st.tuples(st.text(min_size=1), st.integers(0, 100)).map(list)
              | st.just("hello " * 9000) | st.just("\u4e2d" * 700_000)  # longer than the context: 400, quickly
              | st.lists(st.lists(st.lists(st.integers(0, 10)), min_size=1), min_size=1)),
    st.tuples(st.just("logprobs"), st.integers(min_value=21) | st.integers(max_value=-1) | not_a_number),
    st.tuples(st.just("echo"), st.integers() | st.text()),
)
chat_bad_fields = st.one_of(
    common_bad_fields,
    st.tuples(st.just("messages"), st.just([]) | st.text() | st.lists(st.integers(), min_size=1)
              | st.lists(st.fixed_dictionaries({"role": st.text().filter(
                  lambda r: r not in ("system", "developer", "user", "assistant", "tool")), "content": st.text()}),
                  min_size=1)
              | st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
              | st.just([{"role": "user", "content": [{"type": "nope"}]}])
              | st.just([{"role": "user", "content": {"text": "x"}}])
              | st.just([{"role": "user", "content": "hello " * 9000}])
              | st.just([{"role": "user", "content": "x" * 2_000_000}])),
    st.tuples(st.just("logprobs"), st.integers() | st.text()),
    st.tuples(st.just("top_logprobs"), st.integers(min_value=21) | st.integers(max_value=-1)),
    st.tuples(st.just("max_completion_tokens"), st.integers(max_value=0) | beyond_64_bits | st.text()),
    st.tuples(st.just("tool_choice"), st.just("required")),
)
noise_fields = st.dictionaries(st.sampled_from(["user", "foo", "x_extra", "suffix_", "metadata"]), json_value,
                               max_size=3)


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def raw_bodies(base: dict, bad_fields: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Bytes of an invalid body."""

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        body = {**base, **draw(noise_fields)}
        if draw(st.booleans()):
            body["stream"] = True
        field, value = draw(bad_fields)
        body[field] = value
        return encode(body)

    @st.composite
    def deep(draw: st.DrawFn) -> bytes:  # deep nesting where a number or the prompt goes
        depth = draw(st.sampled_from([3, 50, 1000, 100_000]))
        prompt_field = "prompt" if "prompt" in base else "messages"
        field = draw(st.sampled_from(["max_tokens", "temperature", "stop", "n", prompt_field]))
        body = encode(base)[:-1] + b', "' + field.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"
        return body

    @st.composite
    def bad_utf8(draw: st.DrawFn) -> bytes:
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc"]))
        text = encode(base).replace(b"Hello", b"He" + junk + b"llo")
        return text

    huge_number = st.sampled_from(["max_tokens", "n", "seed", "top_k"]).map(
        lambda f: encode(base)[:-1] + b', "' + f.encode() + b'": ' + b"9" * 400 + b"}")
    wrong_top_level = json_value.filter(lambda v: not isinstance(v, dict)).map(encode)
    not_json = st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{"))
    return st.one_of(mutated(), deep(), bad_utf8(), huge_number, wrong_top_level, not_json)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {**server.headers, "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


def check_rejected(resp: httpx.Response, body: bytes) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300], body[:300])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@FUZZ
@given(body=raw_bodies(COMPLETION_BASE, completion_bad_fields))
def test_hostile_completion_bodies_get_4xx(http: httpx.Client, body: bytes) -> None:
    check_rejected(http.post("/v1/completions", content=body), body)


@FUZZ
@given(body=raw_bodies(CHAT_BASE, chat_bad_fields))
def test_hostile_chat_bodies_get_4xx(http: httpx.Client, body: bytes) -> None:
    check_rejected(http.post("/v1/chat/completions", content=body), body)


def test_server_still_serves(http: httpx.Client, server: ServerProcess) -> None:
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={**COMPLETION_BASE, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.log()
