"""The official `openai` client against a real server: completions, chat, streaming, n > 1,
stop, logprobs, seeds, model listing, and the exceptions bad requests raise."""

from __future__ import annotations

import openai
import pytest

from serverproc import API_KEY, MODEL, ServerProcess, wait_idle

PROMPT = "The capital of France is"
COUNTING = "1, 2, 3, 4, 5, 6, 7,"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert models[0].owned_by == "kunlite"


def test_completion_fields_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.created > 0
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text.strip()
    assert r.usage is not None
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_greedy_completion_is_deterministic_and_matches_the_stream(client: openai.OpenAI) -> None:
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    b = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Say hello."}],
                                       max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10  # the chat template's tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens <= 6
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    nonstream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                               max_tokens=6, temperature=0)
    assert text == nonstream.choices[0].message.content


def test_n_greater_than_one(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0,
                                  seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens <= 3 * 8
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 3 * 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                                                 max_tokens=5, n=2, temperature=1.0, seed=3, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_is_cut_and_reported(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0).choices[0].text
    assert " 9" in full, full  # the model counts on
    r = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 9", "zzz"])
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(" 9")]
    assert choice.model_extra.get("stop_reason") == " 9"
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0,
                                            stop=" 9", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) >= 3
        assert top[token] == pytest.approx(value)
        assert max(top.values()) == pytest.approx(value)  # greedy: the sampled token is the best


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        r = client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=10, n=2,
                                      temperature=1.0, seed=seed)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_batch_of_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=[PROMPT, COUNTING], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0)
    assert {c.text for c in r.choices if c.index >= 2} == {single.choices[0].text}


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hello " * 9000}, "prompt"),
    ({"logprobs": 50}, "logprobs"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
])
def test_bad_requests_raise_bad_request_error(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error"


def test_bad_chat_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "image_url" in info.value.message


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_bad_key_raises_authentication_error(server: ServerProcess) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)


def test_nothing_left_running(server: ServerProcess) -> None:
    m = wait_idle(server)
    assert m["kunlite:num_requests_running"] == 0 and m["kunlite:kv_cache_usage_perc"] == 0
    assert m['kunlite:request_success_total{finished_reason="length"}'] > 0
