"""The offline API end to end on SmolLM2: n > 1, seeds, stop strings, logprobs, EOS, length."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kunlite import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2: Path) -> LLM:
    return LLM(str(smollm2), dtype="float32", device_memory="1GiB", max_model_len=512)


def chat(llm: LLM, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return llm.tokenizer.encode(rendered, add_special_tokens=False)


def test_n_choices_are_seeded_and_reproducible(llm: LLM) -> None:
    p = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12)
    a = llm.generate([chat(llm, "Tell me a story.")], p)[0]
    b = llm.generate([chat(llm, "Tell me a story.")], p)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3  # each choice its own stream
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert llm.engine.kv.num_used_blocks == 0


def test_stop_string_ends_the_choice_and_is_not_included(llm: LLM) -> None:
    ids = chat(llm, "Count from one to ten in words, separated by commas.")
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    stop = free.text[12:16]  # four characters from the middle, whatever the tokens are
    assert len(stop) == 4
    stopped = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, stop=(stop,)))[0].outputs[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert llm.engine.kv.num_used_blocks == 0 and not llm.engine.has_unfinished


def test_logprobs_eos_and_length(llm: LLM) -> None:
    ids = chat(llm, "What is the capital of France?")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=40, logprobs=3))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS from generation_config
    assert "Paris" in out.text
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.rank == 1 and lp.top_ids[0] == tok  # greedy picks the top token
        assert len(lp.top_ids) == 3 and lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.logprob <= 0 and math.isclose(lp.logprob, lp.top_logprobs[0], abs_tol=1e-5)
    short = llm.generate([ids], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert short.finish_reason == "length" and short.token_ids == out.token_ids[:3]


def test_bad_input_is_refused_and_leaves_nothing_behind(llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(["hi"], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * 600], SamplingParams())
    assert not llm.engine.has_unfinished and llm.engine.kv.num_used_blocks == 0
