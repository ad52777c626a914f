"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`.

With one device the engine core runs in this process (no HTTP, no worker process): a batch job
owns the machine. With `devices=N` this process is the coordinator of N device workers
(`engine/cluster/`), as the server's engine process is; `close()` (or `with LLM(...)`) stops
them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kunlite.engine.args import EngineOptions
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.core import EngineCore
from kunlite.engine.messages import EngineRequest, TokenLogprobs
from kunlite.engine.output_processor import ChoiceDelta, RequestState
from kunlite.engine.tokenizer import Tokenizer
from kunlite.sampling_params import SamplingParams


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[TokenLogprobs] | None


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int


class LLM:
    def __init__(self, model: str | None = None, **options: Any) -> None:
        opts = EngineOptions(model=model, **options)
        opts.check_cluster()
        self.config = opts.build()
        self.tokenizer = Tokenizer.from_pretrained(self.config.model_dir)
        self.engine: EngineCore | Cluster = Cluster(opts) if opts.devices > 1 else EngineCore(self.config)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the device workers (nothing to do with one device)."""
        if isinstance(self.engine, Cluster):
            self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Run every prompt to completion as one continuously batched workload."""
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        params = sampling_params or SamplingParams()
        param_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompt_list):
            raise ValueError("give one SamplingParams, or one per prompt")
        states = [self._add(p, sp) for p, sp in zip(prompt_list, param_list)]
        for _ in self._run(states):
            pass
        return [self._result(s, p) for s, p in zip(states, prompt_list)]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None) -> list[GenerationResult]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]  # type: ignore[arg-type]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params)

    def stream(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None) -> Iterator[ChoiceDelta]:
        """Yield text deltas of one prompt as they are generated."""
        state = self._add(prompt, sampling_params or SamplingParams())
        yield from self._run([state])

    # ------------------------------------------------------------------ internals

    def _add(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestState:
        params.validate(vocab_size=self.config.model.vocab_size)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.engine.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.engine.max_model_len}")
        rid = f"gen-{next(self._ids)}"
        failed = self.engine.add_request(EngineRequest(rid, ids, params, time.time()))
        if failed:
            raise RuntimeError("no instance of the cluster is serving")
        return RequestState(rid, ids, params, self.tokenizer)

    def _run(self, states: list[RequestState]) -> Iterator[ChoiceDelta]:
        by_id = {s.request_id: s for s in states}
        while not all(s.finished for s in states):
            for out in self.engine.step(0.5):
                delta = by_id[out.request_id].process(out)
                if delta is None:
                    continue
                if delta.abort:
                    self.engine.abort([], [(out.request_id, delta.index)])
                yield delta

    def _result(self, state: RequestState, prompt: str | Sequence[int]) -> GenerationResult:
        outs = [Completion(i, c.detok.text, c.token_ids, c.finish_reason, c.stop_reason,
                           c.logprobs if state.params.logprobs is not None else None)
                for i, c in enumerate(state.choices)]
        return GenerationResult(state.request_id, prompt if isinstance(prompt, str) else None,
                                state.prompt_token_ids, outs, state.num_cached_tokens)
