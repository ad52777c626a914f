"""The OpenAI endpoints: request body -> prompts + SamplingParams -> Generation -> response.

Validation happens before anything reaches the engine; every problem is an ApiError 400
naming the field. Tokenizing and chat templates run off the event loop (`off_loop`) for all
but small bodies, so that a request with megabytes of text never stalls the others.

Streams: the response starts only once the first output is back, so that a request shed at
its deadline, or one that meets a dead engine, still gets a proper status; after that a
failure is an SSE error event followed by [DONE].
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kunlite.sampling_params import SamplingParams, SamplingParamsError
from kunlite.server.errors import ApiError, bad_request, from_decode_error
from kunlite.server.generation import ClientGone, Generation
from kunlite.server.http_guard import DISCONNECTED_STATUS
from kunlite.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields,
                                     encoder)
from kunlite.server.responses import (DONE, ChatFormatter, CompletionFormatter, TokenText, sse_error)
from kunlite.server.runtime import Runtime

log = logging.getLogger("kunlite.server")

MAX_PROMPTS = 256  # prompts in one completions request
MAX_CHOICES = 256  # prompts * n
_RESERVED_TEMPLATE_VARS = {"messages", "tools", "documents", "add_generation_prompt"}
# Bodies up to this size are tokenized on the event loop (a few ms at most): no thread hop,
# and no wait behind a large request in the pool.
INLINE_BODY_BYTES = 8 << 10
# Tokenizer threads: half the cores (the engine needs the rest), between two and four: one
# huge request always leaves a thread for the others.
TOKENIZER_THREADS = max(2, min(4, (os.cpu_count() or 2) // 2))
T = TypeVar("T")


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_body(body: bytes, type_: type[Any]) -> Any:
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise from_decode_error(e) from None


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends (also if the generator never
    started, or the task was cancelled)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class OpenAIServing:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._tokens: TokenText | None = None
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="kunlite-tokenize")

    @property
    def tokens(self) -> TokenText:
        if self._tokens is None:
            self._tokens = TokenText(self.rt.tokenizer)  # type: ignore[arg-type]
        return self._tokens

    async def off_loop(self, body_size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the tokenizer pool, unless the body is small. The tokenizer releases the
        GIL (Tokenizer.encode); a chat template holds it, but only for the interpreter's
        switch interval (5 ms) at a time."""
        if body_size <= INLINE_BODY_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ shared checks

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.rt.model_names:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model or self.rt.model_names[0]

    def check_prompt(self, ids: list[int], param: str) -> None:
        limit = self.rt.max_model_len
        if not ids:
            raise bad_request("the prompt is empty", param)
        if len(ids) >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt "
                              f"has {len(ids)} tokens; at least one must be left for the output.", param,
                              "context_length_exceeded")
        if max(ids) >= self.rt.vocab_size:
            raise bad_request(f"token ids must be below the vocabulary size {self.rt.vocab_size}", param)

    def sampling_params(self, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        room = self.rt.max_model_len - longest
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise bad_request(f"This model's maximum context length is {self.rt.max_model_len} tokens. However, "
                              f"you requested {longest + max_tokens} tokens ({longest} in the prompt, "
                              f"{max_tokens} for the completion).", "max_tokens", "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        n = req.n or 1
        if n * len(prompts) > MAX_CHOICES:
            raise bad_request(f"n times the number of prompts must be at most {MAX_CHOICES}", "n")
        try:
            return SamplingParams(
                n=n, max_tokens=max_tokens, min_tokens=req.min_tokens or 0,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, seed=req.seed,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                stop=tuple(stop), stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos),
                logprobs=logprobs, logit_bias=logit_bias_pairs(req.logit_bias),
                skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            ).validate(vocab_size=self.rt.vocab_size)
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param) from None

    def check_chars(self, text: str, param: str) -> None:
        """Refuse, before tokenizing it (0.5 to 2 us a character), a text longer than any that
        the context can hold: max_model_len tokens of the tokenizer's longest entry."""
        if len(text) > self.rt.max_prompt_chars:
            raise bad_request(f"the text has {len(text)} characters; this model's context of {self.rt.max_model_len} "
                              f"tokens cannot hold more than {self.rt.max_prompt_chars}", param,
                              "context_length_exceeded")

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        self.check_chars(text, param)
        try:
            return self.rt.tokenizer.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[union-attr]
        except ValueError as e:
            raise bad_request(str(e), param) from None

    # ------------------------------------------------------------------ /v1/completions

    def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str] | None]:
        """Token ids of each prompt (str, [str], [int] or [[int]]), and with `echo` their texts.
        Every text's length is checked before any is tokenized, and each prompt right after it
        is, so that a refused request costs the least tokenizing."""
        p = req.prompt
        if isinstance(p, str):
            items: list[Any] = [p]
        elif not p:
            raise bad_request("the prompt is empty", "prompt")
        elif all(isinstance(x, int) for x in p):
            items = [list(p)]
        elif all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            items = list(p)
        else:
            raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of "
                              "lists of token ids", "prompt")
        if len(items) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts in one request", "prompt")
        for x in items:
            if isinstance(x, str):
                self.check_chars(x, "prompt")
        ids = []
        for x in items:
            ids.append(self.encode(x, "prompt") if isinstance(x, str) else list(x))
            self.check_prompt(ids[-1], "prompt")
        if not req.echo:
            return ids, None
        decode = self.rt.tokenizer.decode  # type: ignore[union-attr]
        return ids, [x if isinstance(x, str) else decode(x) for x in items]

    async def completions(self, body: bytes, request: Request) -> Response:
        req: CompletionRequest = decode_body(body, CompletionRequest)
        model = self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise bad_request("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        prompts, texts = await self.off_loop(len(body), self.completion_prompts, req)
        params = self.sampling_params(req, prompts, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        gen = Generation(self.rt, "cmpl", prompts, params, req.priority or 0)
        fmt = CompletionFormatter(gen, model, self.tokens, echo=texts, logprobs=req.logprobs)
        return await self.respond(gen, fmt, request, bool(req.stream), _include_usage(req))

    # ------------------------------------------------------------------ /v1/chat/completions

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise bad_request("messages must not be empty", "messages")
        if req.tool_choice not in (None, "none", "auto"):
            raise bad_request("only tool_choice 'none' and 'auto' are supported", "tool_choice")
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request(f"response_format {req.response_format.type!r} is not supported", "response_format")
        kwargs = dict(req.chat_template_kwargs or {})
        if _RESERVED_TEMPLATE_VARS & kwargs.keys() or not all(k.isidentifier() for k in kwargs):
            raise bad_request("chat_template_kwargs must not set messages, tools, documents or "
                              "add_generation_prompt, and its keys must be identifiers", "chat_template_kwargs")
        messages = chat_messages(req.messages)
        continue_final = bool(req.continue_final_message)
        if continue_final and (req.add_generation_prompt is not False or messages[-1]["role"] != "assistant"):
            raise bad_request("continue_final_message needs add_generation_prompt: false and a final assistant "
                              "message", "continue_final_message")
        try:
            text = self.rt.tokenizer.apply_chat_template(  # type: ignore[union-attr]
                messages, add_generation_prompt=req.add_generation_prompt is not False, tools=req.tools, **kwargs)
        except ValueError as e:
            raise bad_request(f"chat template: {e}", "messages") from None
        if continue_final:
            final = messages[-1].get("content")
            if isinstance(final, str) and final and (cut := text.rfind(final)) >= 0:
                text = text[: cut + len(final)]
        ids = self.encode(text, "messages", add_special_tokens=False)
        self.check_prompt(ids, "messages")
        return ids

    async def chat(self, body: bytes, request: Request) -> Response:
        req: ChatCompletionRequest = decode_body(body, ChatCompletionRequest)
        model = self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        prompt = await self.off_loop(len(body), self.chat_prompt, req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self.sampling_params(req, [prompt], max_tokens, top)
        gen = Generation(self.rt, "chatcmpl", [prompt], params, req.priority or 0)
        fmt = ChatFormatter(gen, model, self.tokens, top_logprobs=top)
        return await self.respond(gen, fmt, request, bool(req.stream), _include_usage(req))

    # ------------------------------------------------------------------ running one

    async def respond(self, gen: Generation, fmt: CompletionFormatter | ChatFormatter, request: Request,
                      stream: bool, include_usage: bool) -> Response:
        handed_over = False  # the SSE response owns `gen` (and closes it) from then on
        try:
            gen.admit()
            gen.watch(request.receive)
            first = await gen.next()
            if stream:
                gen.unwatch()  # from here on the StreamingResponse listens for the disconnect
                handed_over = True
                return _SSEResponse(self._stream(gen, fmt, first, include_usage), on_close=gen.close)
            while not gen.finished:
                await gen.next()
            return Response(encoder.encode(fmt.response()), media_type="application/json")
        except ClientGone:
            self.rt.metrics.aborted("client_disconnect")
            return Response(status_code=DISCONNECTED_STATUS)
        finally:
            if not handed_over:
                gen.close()

    async def _stream(self, gen: Generation, fmt: CompletionFormatter | ChatFormatter,
                      first: tuple[int, Any], include_usage: bool) -> AsyncIterator[bytes]:
        try:
            for chunk in fmt.opening():
                yield chunk
            item = first
            while True:
                data = fmt.chunk(*item)
                if data is not None:
                    yield data
                if gen.finished:
                    break
                item = await gen.next()
            if include_usage:
                yield fmt.usage_chunk()
        except ApiError as e:  # the engine died midway
            yield sse_error(e)
        except ClientGone:  # noticed by the watcher just before the stream began: nobody reads
            return
        except Exception:  # a bug: say so in the stream, keep the server up
            log.exception("stream %s failed", gen.id)
            yield sse_error(ApiError(500, "internal error while streaming", code="internal_error"))
        yield DONE


def logit_bias_pairs(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (token id, bias) pairs; ranges are SamplingParams' to check."""
    pairs = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):  # 10 digits: no huge int to parse
            raise bad_request(f"logit_bias keys must be token ids in decimal, got {key[:20]!r}", "logit_bias")
        pairs.append((int(key), value))
    return tuple(pairs)


def _include_usage(req: SamplingFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them; only text content parts are allowed."""
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                kind = type(part).__struct_config__.tag
                if kind != "text":
                    raise bad_request(f"content parts of type {kind!r} are not supported by this model",
                                      f"messages[{i}].content[{j}]")
                parts.append({"type": "text", "text": part.text})  # type: ignore[union-attr]
            msg["content"] = parts
        elif m.content is not None:
            msg["content"] = m.content
        elif m.role == "assistant":  # null beside tool_calls is valid OpenAI; templates add content to strings
            msg["content"] = ""
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out
