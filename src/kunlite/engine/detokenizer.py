"""Incremental detokenization with stop strings, for streaming.

Two layers, one per concern:

1. Token ids -> complete text (vLLM's prefix_offset / read_offset method). Only a window of
   tokens is decoded per step, so each token costs O(1):

       ids:  [ ... | prefix ......... read | new tokens ]
                     ^ window starts here: already-emitted context, so that decoders that strip
                       a leading space (Metaspace) treat the new tokens as they would in the
                       full decode
       decode(ids[prefix:]) = <done chars, already passed on> + <new text> + <trailing U+FFFD>

   Trailing U+FFFD (an incomplete UTF-8 sequence, e.g. half a CJK character or emoji) is held
   back until the next tokens complete it; the text before it goes out at once. When the window
   decodes with no trailing U+FFFD, the text up to `read` ends on a character boundary and the
   window slides forward: prefix = read, read = len(ids).
   Invariant: the concatenation of everything passed on, plus flush(), == decode(output ids).

2. Complete text -> emitted text with stop strings. A stop string is searched for in the text
   across token boundaries. Characters at the end that could still be the start of a stop string
   (at most len(longest stop) - 1) are held back, and released as soon as they cannot be. On a
   match the stop string and everything after it are dropped.
   Invariant: `text` == the concatenation of all emitted deltas, and never contains a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kunlite.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens that seed the window, as vLLM


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    text: str  # new text to emit (may be "")
    stop: str | None = None  # the stop string that matched; the request is finished when set


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # -- token layer: _ids = prompt context + output ids
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start in _ids
        self._read = len(self._ids)  # the tokens before this end on a character boundary
        self._done = len(self._decode(self._ids))  # chars of decode(_ids[_prefix:]) already passed on
        if self._done and self._decode(self._ids).endswith(_REPLACEMENT):
            # The prompt ends inside a character: the output starts with no context, so that
            # the emitted text is exactly decode(output ids).
            self._ids, self._read, self._done = [], 0, 0
        self._num_context = len(self._ids)
        # -- stop-string layer
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._pending = ""  # complete text not yet emitted: a possible stop-string prefix
        self._text: list[str] = []  # emitted pieces
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far (the full output once finished or flushed)."""
        return "".join(self._text)

    @property
    def stop_matched(self) -> str | None:
        return self._stopped

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def append(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Take the next output tokens; return the text that can be emitted now. After a stop
        string has matched, every call returns an empty delta naming that stop string."""
        if self._stopped is not None:
            return DetokenizerDelta("", self._stopped)
        pieces = []
        for token_id in new_token_ids:  # one window decode per token keeps U+FFFD out early
            self._ids.append(token_id)
            pieces.append(self._complete_text())
        return self._emit("".join(pieces), final=False)

    def flush(self) -> DetokenizerDelta:
        """At the end of the request: everything held back (an incomplete character decodes to
        U+FFFD, exactly as decode() of all the ids), still checked for stop strings."""
        if self._stopped is not None:
            return DetokenizerDelta("", self._stopped)
        window = self._decode(self._ids[self._prefix:])
        tail = window[self._done:]
        self._done = len(window)
        return self._emit(tail, final=True)

    # ------------------------------------------------------------------ token layer

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _complete_text(self) -> str:
        """The new complete characters after the last appended token (two window decodes)."""
        window = self._decode(self._ids[self._prefix:])
        complete = window.rstrip(_REPLACEMENT)
        new = complete[self._done:] if len(complete) > self._done else ""
        self._done = max(self._done, len(complete))
        if len(complete) == len(window):  # ends on a character boundary: slide the window
            self._prefix, self._read = self._read, len(self._ids)
            self._done = len(self._decode(self._ids[self._prefix:]))
        return new

    # ------------------------------------------------------------------ stop-string layer

    def _emit(self, new_text: str, *, final: bool) -> DetokenizerDelta:
        if not self._stops:
            if new_text:
                self._text.append(new_text)
            return DetokenizerDelta(new_text)
        pending = self._pending + new_text
        # A match that was not there before must end in the new text; `pending` holds fewer
        # than _max_stop chars of old text, so searching all of it finds every new match.
        match_at, match = -1, None
        for s in self._stops:
            at = pending.find(s)
            if at != -1 and (match is None or at < match_at):
                match_at, match = at, s
        if match is not None:
            out = pending[:match_at]
            self._stopped, self._pending = match, ""
        else:
            keep = 0 if final else self._held_back(pending)
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        if out:
            self._text.append(out)
        return DetokenizerDelta(out, self._stopped)

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            tail = text[-(len(s) - 1):] if len(s) > 1 else ""
            at = tail.find(s[0])
            while at != -1 and len(tail) - at > best:
                if s.startswith(tail[at:]):
                    best = len(tail) - at  # the leftmost candidate is the longest
                    break
                at = tail.find(s[0], at + 1)
        return best
