"""Turning a Generation's deltas and final state into OpenAI bodies: whole responses, SSE
chunks, usage, and logprobs in both formats (completions: tokens / token_logprobs /
top_logprobs / text_offset; chat: content[{token, logprob, bytes, top_logprobs}]).

The choice index a client sees is prompt_index * n + choice index, as OpenAI numbers the
choices of a batch of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from kunlite.engine.messages import TokenLogprobs
from kunlite.engine.output_processor import ChoiceDelta
from kunlite.engine.tokenizer import Tokenizer
from kunlite.server.errors import ApiError
from kunlite.server.generation import Generation
from kunlite.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                     ChatCompletionResponse, ChatLogprob, ChatLogprobs, CompletionChoice,
                                     CompletionChunk, CompletionLogprobs, CompletionResponse, Delta,
                                     PromptTokensDetails, TopLogprob, Usage, encoder)

DONE = b"data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # OpenAI's stand-in for -inf (JSON has no infinity)


def sse(obj: object) -> bytes:
    return b"data: " + encoder.encode(obj) + b"\n\n"


def sse_error(err: ApiError) -> bytes:
    """The event a stream sends when it fails midway (then [DONE])."""
    return b"event: error\ndata: " + encoder.encode(err.body()) + b"\n\n"


class TokenText:
    """Token id -> the text of that token alone (as vLLM reports logprob tokens), cached."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _lp(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


def usage_of(gen: Generation) -> Usage:
    prompt, completion, cached = gen.usage()
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


class _Formatter:
    def __init__(self, gen: Generation, model: str, tokens: TokenText) -> None:
        self.gen = gen
        self.model = model
        self.tokens = tokens
        self.n = gen.params.n

    def index(self, prompt_index: int, choice: int) -> int:
        return prompt_index * self.n + choice

    def usage_chunk(self) -> bytes:
        raise NotImplementedError


class CompletionFormatter(_Formatter):
    def __init__(self, gen: Generation, model: str, tokens: TokenText, *, echo: list[str] | None,
                 logprobs: int | None) -> None:
        super().__init__(gen, model, tokens)
        self.echo = echo  # prompt texts to prepend, or None
        self.logprobs = logprobs
        self._offset: dict[int, int] = {}  # choice index -> text offset of its next token

    def _logprobs(self, index: int, token_ids: Sequence[int], lps: Sequence[TokenLogprobs] | None,
                  start: int) -> CompletionLogprobs | None:
        if self.logprobs is None or not lps:
            return None
        offset = self._offset.get(index, start)
        out = CompletionLogprobs([], [], [], [])
        for tid, lp in zip(token_ids, lps):
            text = self.tokens(tid)
            top = {self.tokens(t): _lp(v) for t, v in zip(lp.top_ids, lp.top_logprobs)}
            top.setdefault(text, _lp(lp.logprob))
            out.tokens.append(text)
            out.token_logprobs.append(_lp(lp.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self._offset[index] = offset
        return out

    def _prefix(self, prompt_index: int) -> str:
        return self.echo[prompt_index] if self.echo is not None else ""

    def opening(self) -> list[bytes]:
        if self.echo is None:
            return []
        choices = [CompletionChoice(self.index(p, c), self._prefix(p), None, None)
                   for p in range(len(self.gen.states)) for c in range(self.n)]
        return [sse(CompletionChunk(self.gen.id, self.gen.created, self.model, choices))]

    def chunk(self, prompt_index: int, delta: ChoiceDelta) -> bytes | None:
        index = self.index(prompt_index, delta.index)
        logprobs = self._logprobs(index, delta.token_ids, delta.logprobs, len(self._prefix(prompt_index)))
        if not delta.text and delta.finish_reason is None and logprobs is None:
            return None
        choice = CompletionChoice(index, delta.text, logprobs, delta.finish_reason, delta.stop_reason)
        return sse(CompletionChunk(self.gen.id, self.gen.created, self.model, [choice]))

    def usage_chunk(self) -> bytes:
        return sse(CompletionChunk(self.gen.id, self.gen.created, self.model, [], usage_of(self.gen)))

    def response(self) -> CompletionResponse:
        choices = []
        for p, state in enumerate(self.gen.states):
            for c, ch in enumerate(state.choices):
                index = self.index(p, c)
                lps = self._logprobs(index, ch.token_ids, ch.logprobs, len(self._prefix(p)))
                choices.append(CompletionChoice(index, self._prefix(p) + ch.detok.text, lps, ch.finish_reason,
                                                ch.stop_reason))
        return CompletionResponse(self.gen.id, self.gen.created, self.model, choices, usage_of(self.gen))


class ChatFormatter(_Formatter):
    def __init__(self, gen: Generation, model: str, tokens: TokenText, *, top_logprobs: int | None) -> None:
        super().__init__(gen, model, tokens)
        self.top_logprobs = top_logprobs  # None: no logprobs

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.tokens(token_id)
        return TopLogprob(text, _lp(logprob), list(text.encode("utf-8", "replace")))

    def _logprobs(self, token_ids: Sequence[int], lps: Sequence[TokenLogprobs] | None) -> ChatLogprobs | None:
        if self.top_logprobs is None or not lps:
            return None
        content = []
        for tid, lp in zip(token_ids, lps):
            head = self._top(tid, lp.logprob)
            tops = [self._top(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs)][: self.top_logprobs]
            content.append(ChatLogprob(head.token, head.logprob, head.bytes, tops))
        return ChatLogprobs(content)

    def opening(self) -> list[bytes]:
        choices = [ChatChunkChoice(self.index(p, c), Delta(role="assistant", content=""), None, None)
                   for p in range(len(self.gen.states)) for c in range(self.n)]
        return [sse(ChatCompletionChunk(self.gen.id, self.gen.created, self.model, choices))]

    def chunk(self, prompt_index: int, delta: ChoiceDelta) -> bytes | None:
        logprobs = self._logprobs(delta.token_ids, delta.logprobs)
        if not delta.text and delta.finish_reason is None and logprobs is None:
            return None
        choice = ChatChunkChoice(self.index(prompt_index, delta.index), Delta(content=delta.text or None),
                                 logprobs, delta.finish_reason, delta.stop_reason)
        return sse(ChatCompletionChunk(self.gen.id, self.gen.created, self.model, [choice]))

    def usage_chunk(self) -> bytes:
        return sse(ChatCompletionChunk(self.gen.id, self.gen.created, self.model, [], usage_of(self.gen)))

    def response(self) -> ChatCompletionResponse:
        choices = [ChatChoice(self.index(p, c), AssistantMessage(ch.detok.text),
                              self._logprobs(ch.token_ids, ch.logprobs), ch.finish_reason, ch.stop_reason)
                   for p, state in enumerate(self.gen.states) for c, ch in enumerate(state.choices)]
        return ChatCompletionResponse(self.gen.id, self.gen.created, self.model, choices, usage_of(self.gen))
