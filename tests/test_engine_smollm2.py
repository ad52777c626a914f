"""The engine on the pulled SmolLM2-135M-Instruct against HF transformers, token for token.

Nine prompts of mixed lengths run as one batch for 32 greedy tokens each: with chunked prefill
(a budget that splits the long prompts over several steps), without it, and again with a
prefix-cache hit (a shared system prompt computed by an earlier batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kunlite import LLM, SamplingParams
from kunlite.engine.tokenizer import Tokenizer

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "1, 2, 3, 4, 5,",
    ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
     "combined movable metal type, oil-based inks and a wooden press adapted from wine-making. "
     "Within fifty years, presses had spread to more than two hundred cities across Europe, and "
     "the number of books in circulation grew from thousands to millions. Historians argue that "
     "this change made the Reformation, the scientific revolution and the rise of literacy "
     "possible, because ideas could now travel faster than any censor could follow. In the "
     "centuries that followed,"),
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence what a hash table is.",
]
SYSTEM = ("You are a meticulous assistant for a library. You answer questions about books, authors "
          "and reading habits, always politely, briefly and with concrete examples where possible. "
          "Never invent facts; say so when you do not know.")


@pytest.fixture(scope="module")
def hf(smollm2: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def chat_ids(tokenizer: Tokenizer, text: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False)


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def batch(smollm2: Path, hf) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = Tokenizer.from_pretrained(smollm2)
    ids = [tokenizer.encode(p) for p in RAW_PROMPTS] + [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]
    assert len(ids) >= 8 and len({len(i) for i in ids}) >= 6  # mixed lengths, one over 100 tokens
    assert max(len(i) for i in ids) > 100
    return ids, [hf_greedy(hf, i) for i in ids]


def test_chunked_prefill_matches_hf(smollm2: Path, hf, batch) -> None:
    ids, want = batch
    llm = LLM(str(smollm2), dtype="float32", device_memory="1GiB", max_model_len=1024,
              max_num_batched_tokens=48)  # the long prompts take several steps
    got = [r.outputs[0].token_ids for r in llm.generate(ids, GREEDY)]
    assert got == want
    assert llm.engine.kv.num_used_blocks == 0

    # Prefix-cache hit: a shared system prompt, computed by a first batch, served from the cache.
    first = chat_ids(llm.tokenizer, CHAT_PROMPTS[0], SYSTEM)
    llm.generate([first], GREEDY)
    second = [chat_ids(llm.tokenizer, p, SYSTEM) for p in CHAT_PROMPTS[1:]] + [first]
    results = llm.generate(second, GREEDY)
    assert all(r.num_cached_tokens >= 32 for r in results)
    assert [r.outputs[0].token_ids for r in results] == [hf_greedy(hf, i) for i in second]


def test_unchunked_prefill_matches_hf(smollm2: Path, batch) -> None:
    ids, want = batch
    llm = LLM(str(smollm2), dtype="float32", device_memory="1GiB", max_model_len=1024,
              enable_chunked_prefill=False)
    got = [r.outputs[0].token_ids for r in llm.generate(ids, GREEDY)]
    assert got == want
