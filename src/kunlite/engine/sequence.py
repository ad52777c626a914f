"""A sequence: one choice of one request, as the scheduler and the runner see it.

KV validity of a sequence's tokens (token_ids = prompt + output):
    [0, num_computed_tokens)            KV is in the pool (computed, or a prefix-cache hit)
    [num_computed_tokens, num_tokens)   still to run through the model; the scheduler hands
                                        out a chunk of these each step
The last output token never has KV until the next step computes it: a decoding sequence always
has num_tokens - num_computed_tokens == 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kunlite.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its KV in host memory
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str  # unique in the engine: the request id, plus "#i" for the i-th extra choice
    request_id: str
    index: int  # choice index, 0..n-1
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache when first scheduled
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    pending_children: int = 0  # extra choices to fork once the prompt is computed (n > 1)
    order: int = 0  # admission order, the FCFS tie-breaker
    in_flight: bool = False  # in a scheduled step that is not committed yet (pipelines)
    paused: bool = False  # not scheduled: its last KV is being copied to another instance

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int, times: int = 1) -> None:
        """The sampled token (`times` over: the steps a simulator's fast-forward stands for)."""
        self.output_token_ids.extend([token_id] * times)
        self.token_ids.extend([token_id] * times)

    def priority_key(self) -> tuple[int, float, int]:
        """Smaller runs first: priority, then arrival, then admission order."""
        return (self.priority, self.arrival_time, self.order)
