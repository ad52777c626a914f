"""Typed messages between the front end (server or offline LLM) and the engine process.

A new request travels in full once (`EngineRequest`); after that only diffs move: aborts
towards the engine, and per-step new token ids towards the front end (`EngineOutputs`).
Everything is a msgspec Struct encoded as msgpack: nothing is ever unpickled.
"""

from __future__ import annotations

import msgspec

from kunlite.sampling_params import SamplingParams

# ---------------------------------------------------------------- front end -> engine


class EngineRequest(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.time() when the front end accepted it
    priority: int = 0  # lower runs first under the priority policy (vLLM's convention)
    instance: int | None = None  # the instance the front end dispatched it to; None: the engine picks


class AbortRequests(msgspec.Struct, frozen=True, tag=True):
    """Abort whole requests (`request_ids`) or single choices (`choices`: (request_id, index)),
    e.g. one of n choices that hit a stop string."""

    request_ids: list[str]
    choices: list[tuple[str, int]] = []


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


ToEngine = EngineRequest | AbortRequests | Shutdown

# ---------------------------------------------------------------- engine -> front end


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of the sampled token and the top-n alternatives (ids and logprobs, best first)."""

    logprob: float
    rank: int  # 1-based rank of the sampled token in the distribution
    top_ids: list[int]
    top_logprobs: list[float]


class RequestOutput(msgspec.Struct, frozen=True, array_like=True):
    """What one sequence produced in one engine step.

    `index` is the choice index (0..n-1) for n > 1. `finish_reason` is None while running,
    else "stop" (EOS or a stop token), "length" (max_tokens or the context is full),
    "abort", or "error".
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


class StepTiming(msgspec.Struct, frozen=True, array_like=True):
    """One engine step, for the front end's online cost model."""

    num_prefill_tokens: int
    num_decode_tokens: int
    num_context_tokens: int  # sum of KV lengths attended over
    seconds: float
    instance: int = 0
    started: float = 0.0  # the engine clock when it was planned ...
    ended: float = 0.0  # ... and committed (seconds == ended - started)
    stages: int = 1  # members of the instance that ran it
    batch: list[tuple[int, int]] | None = None  # (new tokens, context) per sequence, with --step-log only


# Instance states in which an instance steps and takes requests; a restoring one takes requests
# into its queue (the split hands them to the replicas) but does not step; degraded and
# restarting ones do neither.
SERVING_STATES = ("serving", "pipeline", "exchanging")
ACCEPTING_STATES = SERVING_STATES + ("restoring",)


class DeviceStats(msgspec.Struct, frozen=True):
    """One device of an instance, as the monitor reports it."""

    rank: int
    pid: int | None
    host: str
    device: str
    layers: tuple[int, int]  # the layers it runs, [l0, l1)
    alive: bool
    param_bytes: int
    kv_used_bytes: int
    kv_total_bytes: int


class InstanceStats(msgspec.Struct, frozen=True):
    """One instance (a replica, or a pipeline group): its queue, its KV in blocks, its devices.
    State: serving (a replica, or a static pipeline) | exchanging (a group just merged by the
    parameter-centric policy, moving its requests' KV) | pipeline (a merged group, every
    request placed) | restoring (splitting back into replicas) | degraded (a member died; its
    requests failed) | restarting (a member is being replaced; communication is re-formed)."""

    id: int
    state: str
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    waiting_blocks: int  # blocks the waiting requests need for their prompts
    page_size: int
    devices: list[DeviceStats] = []
    exchange_left: int = 0  # requests whose KV is still to move (a merged group)
    exchanged_bytes: int = 0  # moved so far by this group's exchange
    bubble_fraction: float = 0.0  # a pipeline's stage idle time over its busy wall time


class EngineStats(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    num_preemptions_total: int
    param_pages: int
    page_size: int
    prefix_cache_hit_tokens_total: int = 0
    instances: list[InstanceStats] = []
    # overload policies, cumulative
    num_swaps_out_total: int = 0
    num_swaps_in_total: int = 0
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    num_migrations_total: int = 0
    migration_bytes_total: int = 0
    migration_pause_seconds_total: float = 0.0
    num_migrations_aborted_total: int = 0
    num_worker_deaths_total: int = 0
    # the parameter-centric policy, cumulative
    num_drops_total: int = 0
    num_restores_total: int = 0
    exchanged_bytes_total: int = 0
    remote_attention_calls_total: int = 0
    state_seconds_total: dict[str, float] = {}  # instance-seconds spent in each state

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0


class ClusterEvent(msgspec.Struct, frozen=True, array_like=True):
    """Something the monitor's timeline marks. kind: preemption | swap_out | swap_in |
    migration | migration_aborted | worker_death | instance_restored (and, with the
    parameter-centric policy, drop | exchange | restore)."""

    time: float  # unix seconds
    kind: str
    instance: int
    detail: str = ""


class EngineOutputs(msgspec.Struct, frozen=True, tag=True):
    outputs: list[RequestOutput]
    stats: EngineStats
    timings: list[StepTiming]
    # (request_id, seconds) for requests the scheduler ran for the first time: how long each
    # waited in the engine's queue (the server's request_queue_time metric)
    queue_times: list[tuple[str, float]] = []
    moved: list[tuple[str, int]] = []  # (request_id, instance): requests that changed instance
    events: list[ClusterEvent] = []


class EngineReady(msgspec.Struct, frozen=True, tag=True):
    kv_capacity_tokens: int
    max_model_len: int
    num_layers: int
    dtype: str
    attention_backend: str
    num_instances: int = 1
    num_devices: int = 1


class EngineDead(msgspec.Struct, frozen=True, tag=True):
    message: str


FromEngine = EngineOutputs | EngineReady | EngineDead
