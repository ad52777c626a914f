"""The OpenAI API bodies (and vLLM's extensions) as msgspec Structs.

Requests are decoded strictly: a wrong type is a msgspec.ValidationError whose message names
the field (`... - at `$.max_tokens``), which the server turns into a 400. Every integer has
bounds, so that no arbitrary-precision int from the network reaches the engine's msgpack.
Unknown fields are ignored, as OpenAI does. Ranges that need a message of their own
(temperature, top_p, ...) are checked by SamplingParams.validate.

Responses carry every field the OpenAI API defines, with null where it has no value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# ---------------------------------------------------------------- bounded scalars

Int32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
NonNegInt = Annotated[int, Meta(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # OpenAI's seed is an int64
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]

# ---------------------------------------------------------------- requests


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM; accepted, not used


class SamplingFields(Struct, kw_only=True):
    """Fields shared by completions and chat completions (OpenAI, then vLLM extensions)."""

    model: str | None = None
    n: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: NonNegInt | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    priority: Int32 | None = 0


class CompletionRequest(SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]; homogeneity is checked after decoding
    # (msgspec allows one array type per union).
    prompt: str | list[str | TokenId | list[TokenId]]
    echo: bool | None = False
    logprobs: TopLogprobs | None = None
    best_of: PositiveInt | None = None
    suffix: str | None = None


class TextPart(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageURLPart(Struct, tag="image_url", tag_field="type", kw_only=True):
    image_url: Any = None


class InputAudioPart(Struct, tag="input_audio", tag_field="type", kw_only=True):
    input_audio: Any = None


class FilePart(Struct, tag="file", tag_field="type", kw_only=True):
    file: Any = None


ContentPart = TextPart | ImageURLPart | InputAudioPart | FilePart


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(Struct, kw_only=True):
    type: str
    json_schema: Any = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's /tokenize: either `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[TokenId]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None  # vLLM: the stop string or token id that ended it


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"
    system_fingerprint: str | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatLogprob] | None


class AssistantMessage(Struct):
    content: str | None
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[Any] = []


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


class CompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"
    system_fingerprint: str | None = None


class ModelCard(Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: str = "model"
    owned_by: str = "kunlite"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Struct):
    prompt: str


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(Struct):
    error: ErrorInfo


encoder = msgspec.json.Encoder()
