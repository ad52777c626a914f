"""Request sets for `bench serve`: random lengths, ShareGPT JSON, BurstGPT CSV.

Every loader returns a list of `Sample`s. A sample's `prompt_len` is the prompt's length in
tokens as far as the client can know it: exact when a tokenizer is given, an estimate
otherwise. The server's `usage` replaces it in the per-request records whenever the server
reports usage.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Common English words that are one token each (with their leading space) in the usual BPE
# vocabularies, so that n words make a prompt of about n tokens without a tokenizer.
_WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for that on with as by at from his her they this had not are but
    were which one all she there been their has have when who will more no if out so said what up
    its about into than them can only other new some could time these two may then first any my
    now such like our over man me even most made after also did many before must through back
    years where much your way well down should because each just those people how too little
    state good very make world still own see men work long get here between both life being under
    never day same another know while last might us great old year off come since against go came
    right used take three small house light water part place high family""".split()
)

# ShareGPT filters, as vLLM applies them: a pair whose prompt or output is shorter than this
# many tokens is dropped, and so is one whose prompt or prompt+output is longer than these.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048

# Token estimate per whitespace-separated word when no tokenizer is given.
TOKENS_PER_WORD = 1.3

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")


@dataclass
class Sample:
    prompt: str
    prompt_len: int  # tokens: exact with a tokenizer, else an estimate
    output_len: int  # sent as max_tokens
    timestamp: float | None = None  # trace arrival time in seconds (BurstGPT), else None


class TextTokens:
    """Token counting and exact-length prompt building, with or without a HF tokenizer."""

    def __init__(self, tokenizer_path: str | None = None) -> None:
        self.tokenizer: Any = None
        self._ids: np.ndarray | None = None  # non-special token ids, for random prompts
        if tokenizer_path is not None:
            self.tokenizer = load_tokenizer(tokenizer_path)
            special = {
                tid
                for tid, tok in self.tokenizer.get_added_tokens_decoder().items()
                if tok.special
            }
            vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
            pieces = self.tokenizer.decode_batch([[i] for i in range(vocab)])
            # Byte tokens that are not whole characters decode to U+FFFD, which re-encodes to
            # several tokens; leaving them out lets decode/re-encode keep the length.
            self._ids = np.array(
                [i for i, t in enumerate(pieces) if i not in special and t and "\ufffd" not in t],
                dtype=np.int64,
            )
            if self._ids.size == 0:
                raise SystemExit(f"--tokenizer {tokenizer_path}: no usable tokens")

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return int(math.ceil(len(text.split()) * TOKENS_PER_WORD)) if text.strip() else 0

    def random_prompt(self, n: int, rng: np.random.Generator) -> tuple[str, int]:
        """A prompt of n tokens (exactly, with a tokenizer) and its length.

        With a tokenizer it decodes random ids and re-encodes (as vLLM does); decoding can merge
        or split tokens, so it trims or pads and retries, and keeps the closest length found.
        """
        if n <= 0:
            return "", 0
        if self.tokenizer is None or self._ids is None:
            words = rng.choice(len(_WORDS), size=n)
            return " ".join(_WORDS[w] for w in words), n
        ids = self._ids[rng.integers(0, len(self._ids), size=n)].tolist()
        best: tuple[str, int] | None = None
        for _ in range(10):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            got = self.tokenizer.encode(text, add_special_tokens=False).ids
            if best is None or abs(len(got) - n) < abs(best[1] - n):
                best = (text, len(got))
            if len(got) == n:
                break
            if len(got) > n:
                ids = got[:n]
            else:
                extra = self._ids[rng.integers(0, len(self._ids), size=n - len(got))].tolist()
                ids = got + extra
        assert best is not None
        return best


def load_tokenizer(path: str) -> Any:
    """A `tokenizers.Tokenizer` from a HF model directory (its tokenizer.json) or the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SystemExit("--tokenizer needs the `tokenizers` package") from e
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise SystemExit(f"--tokenizer: no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


def _warn(msg: str) -> None:
    print(f"bench serve: {msg}", file=sys.stderr)


def sample_lengths(
    mean: int, range_ratio: float, n: int, rng: np.random.Generator, low_min: int = 0
) -> np.ndarray:
    """n lengths uniform over the integers in [floor(mean*(1-r)), ceil(mean*(1+r))] (vLLM)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    low = max(low_min, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def load_random(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    tokens: TextTokens,
    rng: np.random.Generator,
) -> list[Sample]:
    ins = sample_lengths(input_len, range_ratio, num, rng)
    outs = sample_lengths(output_len, range_ratio, num, rng, low_min=1)
    samples = []
    for n_in, n_out in zip(ins.tolist(), outs.tolist()):
        prompt, plen = tokens.random_prompt(n_in, rng)
        samples.append(Sample(prompt, plen, n_out))
    return samples


def _first_turns(conv: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The first human turn and the first gpt turn after it, or None."""
    human = None
    for turn in conv:
        who, text = turn.get("from"), turn.get("value")
        if not isinstance(text, str):
            continue
        if human is None and who in ("human", "user"):
            human = text
        elif human is not None and who in ("gpt", "assistant", "chatgpt"):
            return human, text
    return None


def load_sharegpt(
    path: str, num: int, tokens: TextTokens, rng: np.random.Generator
) -> list[Sample]:
    """num (prompt, output length) pairs, shuffled with rng, filtered as vLLM filters them.

    When fewer pairs survive the filters than asked for, it samples them again (with
    replacement) to make up num, as vLLM does, and says so.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of conversations")
    order = rng.permutation(len(data))
    out: list[Sample] = []
    for i in order.tolist():
        entry = data[i]
        conv = entry.get("conversations") if isinstance(entry, dict) else None
        pair = _first_turns(conv) if isinstance(conv, list) else None
        if pair is None:
            continue
        plen, olen = tokens.count(pair[0]), tokens.count(pair[1])
        if plen < SHAREGPT_MIN_LEN or olen < SHAREGPT_MIN_LEN:
            continue
        if plen > SHAREGPT_MAX_PROMPT_LEN or plen + olen > SHAREGPT_MAX_TOTAL_LEN:
            continue
        out.append(Sample(pair[0], plen, olen))
        if len(out) == num:
            return out
    if not out:
        raise SystemExit(f"{path}: no conversation passes the ShareGPT length filters")
    _warn(f"{path}: {len(out)} usable conversations for {num} prompts; sampling again")
    extra = rng.integers(0, len(out), size=num - len(out)).tolist()
    return out + [out[i] for i in extra]


def read_burstgpt_rows(
    path: str,
    models: Collection[str] | None = None,
    log_types: Collection[str] | None = None,
) -> list[tuple[float, int, int]]:
    """(timestamp, request tokens, response tokens) of a BurstGPT CSV's usable rows, sorted by
    timestamp (stable: equal timestamps keep file order).

    Rows with 0 request or response tokens (failed requests in the trace) or unreadable
    numbers are skipped; with `models` / `log_types`, so are rows whose Model / Log Type is
    not among them.
    """
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = BURSTGPT_COLUMNS + (("Log Type",) if log_types is not None else ())
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: not a BurstGPT CSV, missing columns {missing}")
        for row in reader:
            if models is not None and row["Model"] not in models:
                continue
            if log_types is not None and row["Log Type"] not in log_types:
                continue
            try:
                ts = float(row["Timestamp"])
                n_in, n_out = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (TypeError, ValueError):
                continue
            if n_in > 0 and n_out > 0:
                rows.append((ts, n_in, n_out))
    rows.sort(key=lambda r: r[0])
    return rows


def load_burstgpt(
    path: str, num: int, tokens: TextTokens, rng: np.random.Generator
) -> list[Sample]:
    """The first num rows of a BurstGPT trace by Timestamp, as random prompts of its lengths.

    Rows with 0 request or response tokens (failed requests in the trace) are skipped. A
    contiguous window, not a random sample, so that the timestamps replay a real stretch of
    the trace. With fewer rows than num it uses them all and says so.
    """
    rows = read_burstgpt_rows(path)
    if not rows:
        raise SystemExit(f"{path}: no usable rows")
    if len(rows) < num:
        _warn(f"{path}: {len(rows)} usable rows for {num} prompts; using {len(rows)}")
    samples = []
    for ts, n_in, n_out in rows[:num]:
        prompt, plen = tokens.random_prompt(n_in, rng)
        samples.append(Sample(prompt, plen, n_out, timestamp=ts))
    return samples
