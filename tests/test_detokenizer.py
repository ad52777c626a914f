"""Incremental detokenization and stop strings, streamed one token at a time through a real
byte-level BPE (tokens that end inside a UTF-8 character are common in it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunlite.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from kunlite.engine.tokenizer import Tokenizer

try:
    from test_tokenizer import CORPUS, smollm2_dir, write_tiny_bpe  # tests/ is on sys.path (rootdir-less layout)
except ImportError:  # pragma: no cover - tests/ made a package
    from tests.test_tokenizer import CORPUS, smollm2_dir, write_tiny_bpe

FFFD = "\ufffd"
# Characters from the training corpus (so that merges fire), plus any unicode but U+FFFD.
CHARS = st.sampled_from(sorted(set("".join(CORPUS)))) | st.characters(
    blacklist_categories=("Cs",), blacklist_characters=FFFD)
TEXT = st.text(CHARS, max_size=40)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_tiny_bpe(tmp_path_factory.mktemp("tiny")))


def stream(det: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[DetokenizerDelta]:
    """Append ids one at a time (or in the given chunk sizes), then flush unless stopped."""
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        if i >= len(ids):
            break
        deltas.append(det.append(ids[i:i + size]))
        i += size
    if i < len(ids):
        deltas.append(det.append(ids[i:]))
    if det.stop_matched is None:
        deltas.append(det.flush())
    return deltas


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One byte-level token per UTF-8 byte of `text`: the worst case for split characters.
    Byte b is the token named by GPT-2's bytes_to_unicode table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    token_id = {t: i for i, t in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size)))}
    return [token_id[table[b]] for b in text.encode()]


# ---------------------------------------------------------------------------- incremental decoding


@settings(max_examples=120, deadline=None)
@given(prompt=TEXT, text=TEXT, chunks=st.lists(st.integers(1, 4), max_size=20), skip=st.booleans())
def test_streaming_concatenates_to_decode(tok: Tokenizer, prompt: str, text: str, chunks: list[int],
                                          skip: bool) -> None:
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, tok.encode(prompt), skip_special_tokens=skip, stop=())
    deltas = stream(det, ids, chunks)
    assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=skip) == text
    assert det.text == text
    assert all(FFFD not in d.text for d in deltas)  # never an incomplete character
    assert det.output_token_ids == ids


def test_split_characters_are_held_until_complete(tok: Tokenizer) -> None:
    ids = byte_token_ids(tok, "a😀日")  # 1 + 4 + 3 byte tokens
    assert tok.decode(ids) == "a😀日"
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert [det.append([i]).text for i in ids] == ["a", "", "", "", "😀", "", "", "日"]
    partial = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert partial.append(ids[:3]).text == "a"
    assert partial.flush().text == tok.decode(ids[:3])[1:] and FFFD in tok.decode(ids[:3])  # as decode()


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = byte_token_ids(tok, "😀x")
    det = IncrementalDetokenizer(tok, ids[:2], skip_special_tokens=True)
    assert "".join(d.text for d in stream(det, ids[2:])) == tok.decode(ids[2:])


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>héllo<|im_end|>")
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(d.text for d in stream(kept, ids)) == "<|im_start|>héllo<|im_end|>"
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(d.text for d in stream(skipped, ids)) == "héllo"


def test_work_per_token_is_bounded(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    longest = 0
    decode = tok.decode

    def spy(ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        nonlocal longest
        longest = max(longest, len(ids))
        return decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    ids = tok.encode(" ".join(CORPUS) * 10)
    det = IncrementalDetokenizer(tok, tok.encode("a prompt of some length " * 20), skip_special_tokens=True)
    stream(det, ids)
    assert len(ids) > 500 and longest <= 12  # a window of a few tokens, not the whole output
    assert det.text == decode(ids)


# ---------------------------------------------------------------------------- stop strings


def complete_text(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids).rstrip(FFFD)


def longest_stop_prefix_suffix(text: str, stop: str) -> int:
    return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


@settings(max_examples=120, deadline=None)
@given(text=TEXT, stop=st.text(st.sampled_from("ab日😀 é"), min_size=1, max_size=4), data=st.data())
def test_stop_string_streamed(tok: Tokenizer, text: str, stop: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(text)), label="at")
    full = text[:at] + stop + text[at:]
    expected = full[: full.find(stop)]
    ids = tok.encode(full)
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=[stop])
    emitted = ""
    for k in range(len(ids)):
        delta = det.append(ids[k:k + 1])
        emitted += delta.text
        assert expected.startswith(emitted)  # nothing of the stop string, or after it, leaks
        if delta.stop is not None:
            break
        # Held back: exactly the part that could still start the stop string (plus split bytes).
        seen = complete_text(tok, ids[: k + 1])
        assert emitted == seen[: len(seen) - longest_stop_prefix_suffix(seen, stop)]
    assert delta.stop == stop and emitted == expected == det.text
    assert det.append(ids[-1:]) == DetokenizerDelta("", stop) and det.flush() == DetokenizerDelta("", stop)


def test_stop_strings_across_tokens_and_flush(tok: Tokenizer) -> None:
    ids = byte_token_ids(tok, "xx日本yy")
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["本y", "zz"])
    deltas = [det.append([i]) for i in ids]
    assert "".join(d.text for d in deltas) == "xx日" and deltas[-2].stop == "本y"
    # A possible prefix held at the end comes out at flush.
    held = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["yz"])
    assert "".join(d.text for d in stream(held, ids[:-1])) == "xx日本y"
    assert held.stop_matched is None


def test_first_stop_string_wins(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["world", "lo w"])
    deltas = stream(det, tok.encode("Hello world, again"))
    assert "".join(d.text for d in deltas) == "Hel" and det.stop_matched == "lo w"
    no_stop = IncrementalDetokenizer(tok, [], skip_special_tokens=True, stop=["xyz"])
    assert "".join(d.text for d in stream(no_stop, tok.encode("Hello x"))) == "Hello x"


def test_smollm2_streaming() -> None:
    tok = Tokenizer.from_pretrained(smollm2_dir())
    text = " ".join(CORPUS) + " 𝄞 ☃ \u00e9 e\u0301"
    ids = tok.encode(text)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True, stop=["русский"])
    deltas = stream(det, ids + sorted(tok.eos_token_ids))
    assert "".join(d.text for d in deltas) == text[: text.find("русский")] and det.stop_matched == "русский"
    assert all(FFFD not in d.text for d in deltas)
