"""Per-request sampling parameters: one typed struct shared by the offline API, the server and
the engine process (it travels inside msgspec messages)."""

from __future__ import annotations

import math

import msgspec

MAX_LOGIT_BIAS = 300  # entries in logit_bias, OpenAI's limit


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `param` names the field (for the OpenAI error body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    n: int = 1
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0  # EOS and stop_token_ids are ignored before this many tokens
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: the sampled token only)
    # (token id, bias) pairs, ids distinct: the bias is added to that token's logit before
    # penalties and sampling (OpenAI semantics; -100 all but bans a token, +100 all but forces it)
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, *, vocab_size: int | None = None) -> "SamplingParams":
        """Raise SamplingParamsError naming the first bad field; return self when all is well."""
        checks: list[tuple[bool, str, str]] = [
            (1 <= self.n <= 128, "n", f"n must be between 1 and 128, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}"),
            (0.0 <= self.temperature <= 100.0, "temperature",
             f"temperature must be between 0 and 100, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, "top_k", f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             f"presence_penalty must be between -2 and 2, got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
             f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (len(self.stop) <= 16 and all(0 < len(s) <= 1024 for s in self.stop), "stop",
             "stop takes at most 16 non-empty strings of at most 1024 characters"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "seed must fit in 64 bits"),
        ]
        bias_ids = [t for t, _ in self.logit_bias]
        checks += [
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
             f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}"),
            (len(set(bias_ids)) == len(bias_ids), "logit_bias", "logit_bias names a token more than once"),
            (all(math.isfinite(b) and -100.0 <= b <= 100.0 for _, b in self.logit_bias), "logit_bias",
             "logit_bias values must be between -100 and 100"),
        ]
        if vocab_size is not None:
            checks.append((all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
                           f"stop_token_ids must be token ids below the vocabulary size {vocab_size}"))
            checks.append((all(0 <= t < vocab_size for t in bias_ids), "logit_bias",
                           f"logit_bias keys must be token ids below the vocabulary size {vocab_size}"))
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(param, message)
        return self
