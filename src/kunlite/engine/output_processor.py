"""Front-end bookkeeping of a request: token ids from the engine -> text for the client.

Shared by the offline `LLM` and the server. Each choice has an incremental detokenizer that
also matches stop strings; when one matches, the choice finishes with reason "stop" here, and
the caller must tell the engine to abort that choice (`ChoiceDelta.abort`).

A choice is finished once it has reported a finish_reason; anything the engine sends for it
afterwards (tokens computed before the abort arrived) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kunlite.engine.detokenizer import IncrementalDetokenizer
from kunlite.engine.messages import RequestOutput, TokenLogprobs
from kunlite.engine.tokenizer import Tokenizer
from kunlite.sampling_params import SamplingParams


@dataclass
class ChoiceDelta:
    """What one engine output means for one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    abort: bool = False  # the engine still runs this choice and must be told to stop


@dataclass
class ChoiceState:
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class RequestState:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.choices = [
            ChoiceState(IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens,
                                               stop=params.stop))
            for _ in range(params.n)
        ]
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def process(self, out: RequestOutput) -> ChoiceDelta | None:
        """Apply one engine output; None when it changes nothing the client sees."""
        choice = self.choices[out.index]
        if choice.finish_reason is not None:
            return None
        self.num_cached_tokens = out.num_cached_tokens
        choice.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
        delta = choice.detok.append(out.new_token_ids)
        text, reason, abort = delta.text, out.finish_reason, False
        if delta.stop is not None:
            reason, abort, choice.stop_reason = "stop", out.finish_reason is None, delta.stop
        elif reason is not None:
            text += choice.detok.flush().text
            if reason == "stop" and out.new_token_ids and out.new_token_ids[-1] in self.params.stop_token_ids:
                choice.stop_reason = out.new_token_ids[-1]
        choice.finish_reason = reason
        return ChoiceDelta(out.index, text, list(out.new_token_ids), out.logprobs, reason,
                           choice.stop_reason, abort)

    def text(self, index: int) -> str:
        return self.choices[index].detok.text
