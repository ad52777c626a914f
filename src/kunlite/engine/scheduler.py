"""Continuous-batching scheduler: plain state in, decisions out.

Tokens are scheduled, not phases (vLLM v1): each step hands every sequence a number of new
tokens so that `num_computed_tokens` catches up with `num_tokens`. A decode gets one token, a
prompt gets a chunk (chunked prefill) or all of it, and both share one step under the token
budget. Running sequences go first (FCFS among themselves); then waiting ones are admitted in
queue order while the budget, the sequence cap and the KV allow. When KV runs out for a running
sequence, the lowest-priority, latest running sequence is preempted through the policy hook.

A pipeline keeps several steps (microbatches) in flight: `schedule` then skips the sequences
that are in flight (`Sequence.in_flight`, set by the caller until the step is committed), never
preempts one (its KV is being written), and takes the microbatch's own token budget and cap on
running sequences (admission is bounded by the budget and --max-num-seqs alone).

The scheduler never touches tensors: it moves Sequence objects between queues and asks the
BlockManager, which is plain accounting too.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from kunlite.config import SchedulerConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.preemption import PreemptionPolicy, RecomputePolicy, select_victim
from kunlite.engine.sequence import Sequence, SeqStatus
from kunlite.sampling_params import SamplingParams


@dataclass
class SchedulerOutput:
    # (sequence, new tokens), single-token entries first: the attention backends rely on it.
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    resumed: list[Sequence] = field(default_factory=list)  # swapped-out sequences brought back
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(1 for _, n in self.scheduled if n == 1)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: BlockManager, policy: PreemptionPolicy,
                 *, priority_order: bool = False) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        self.priority_order = priority_order  # waiting queue by (priority, arrival) instead of FCFS
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # preempted with their KV in host memory (swap policy)
        self.num_preemptions = 0
        self._order = itertools.count()

    # ------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        seq.order = next(self._order)
        seq.status = SeqStatus.WAITING
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence, *, front: bool = False) -> None:
        if self.priority_order:
            bisect.insort(self.waiting, seq, key=Sequence.priority_key)
        elif front:
            self.waiting.insert(0, seq)
        else:
            self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the queues for good and release its KV."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self.policy.discard(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if seq.seq_id in self.kv.tables:
                self.kv.free(seq.seq_id)
            else:
                self.kv.forget(seq.seq_id)

    def find(self, request_id: str) -> list[Sequence]:
        return [s for s in self.running + self.swapped + self.waiting if s.request_id == request_id]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self.swapped)

    def detach(self, seq: Sequence) -> None:
        """A running sequence leaves this scheduler alive (migrated): its KV here is freed."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)

    def requeue(self, seq: Sequence) -> None:
        """Recompute a running sequence later: its KV is freed and it waits at the front."""
        self.running.remove(seq)
        RecomputePolicy().preempt(seq, self.kv)
        self._enqueue(seq, front=True)

    def attach(self, seq: Sequence) -> None:
        """A running sequence arrives with its KV already in place (the end of a migration)."""
        seq.order = next(self._order)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    # ------------------------------------------------------------------ one step

    def schedule(self, budget: int | None = None, max_running: int | None = None,
                 cost: Callable[[list[tuple[int, int]]], float] | None = None,
                 cost_limit: float | None = None, min_chunk: int = 0) -> SchedulerOutput:
        """One step: `budget` tokens (default: the configured budget), of which at most
        `max_running` go to running sequences (a pipeline splits its decodes over microbatches);
        the rest of the budget admits waiting ones. With `cost` (seconds of a batch of
        (new tokens, context) pairs, additive: a per-step constant plus each sequence's own
        share, as the step model is) the step stops growing at `cost_limit` (it always takes
        one sequence), a prompt's chunk cut to what still fits: a pipeline's microbatches of
        balanced cost. A running sequence's chunk (a prompt in progress) is never cut below
        `min_chunk` tokens, or its remainder: a sequence is in one microbatch at a time, so
        cutting it to a share of the work left would halve its chunks step after step."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens if budget is None else budget
        seats = max_running if max_running is not None else self.config.max_num_seqs
        chunked = self.config.enable_chunked_prefill
        shape: list[tuple[int, int]] = []  # (q, c) of what is scheduled so far
        base = cost([]) if cost is not None else 0.0
        spent = [base]  # cost(shape), kept as it grows (one sequence costed at a time, not the whole shape)

        def share(n: int, context: int) -> float:
            return cost([(n, context)]) - base if cost is not None else 0.0

        def add(n: int, context: int, cost_of: float | None = None) -> None:
            """`cost_of`: share(n, context), if known."""
            shape.append((n, context))
            spent[0] += share(n, context) if cost_of is None else cost_of

        def affordable(n: int, context: int, cost_of: float | None = None) -> int:
            """How many of n new tokens fit under the cost limit (all of them without a limit or
            in an empty step; a prompt's chunk is cut, with chunked prefill; 0: none fit).
            `cost_of`: share(n, context), if known."""
            if cost is None or cost_limit is None or not shape or \
                    spent[0] + (share(n, context) if cost_of is None else cost_of) <= cost_limit:
                return n
            if not chunked:
                return 0
            lo, hi = 0, n - 1  # cost grows with the chunk: the largest k <= hi that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if spent[0] + share(mid, context) <= cost_limit:
                    lo = mid
                else:
                    hi = mid - 1
            return lo

        # 1. Running sequences, oldest first.
        for seq in list(self.running):
            if budget <= 0 or len(out.scheduled) >= seats:
                break
            if seq.in_flight or seq.paused or seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop, in a step not yet committed, or migrating
            n = len(seq.token_ids) - seq.num_computed_tokens  # num_uncomputed
            if chunked and n > budget:
                n = budget
            if n > budget:
                continue
            whole = share(n, seq.num_computed_tokens)  # costed once if it all fits
            fits = affordable(n, seq.num_computed_tokens, whole)
            if n > 1 and chunked:
                fits = max(fits, min(n, min_chunk))
            if fits == 0:
                break  # the microbatch is full
            if not self._make_room(seq, fits, out):
                continue
            out.scheduled.append((seq, fits))
            add(fits, seq.num_computed_tokens, whole if fits == n else None)
            budget -= fits

        # 2. Swapped-out sequences come back (into fresh blocks, their KV copied in) before any
        #    new sequence is admitted; none in a step that preempted.
        while self.swapped and not out.preempted and budget > 0:
            seq = self.swapped[0]
            n = self._resume_tokens(seq, budget)
            if n == 0:
                break
            self.swapped.pop(0)
            self.policy.resume(seq, self.kv, seq.num_computed_tokens + n)
            out.resumed.append(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

        # 3. Waiting sequences, in queue order; none are admitted in a step that preempted, nor
        #    while a swapped-out one waits to come back.
        while self.waiting and not self.swapped and not out.preempted and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            hits, cached, n = self._admit_tokens(seq, budget, affordable)
            if n == 0:
                break
            total = cached + n
            self.waiting.pop(0)
            self.kv.allocate(seq.seq_id, total, hits)
            if seq.num_computed_tokens == 0 and not seq.output_token_ids:
                seq.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            add(n, cached)
            budget -= n

        if self.kv.enable_prefix_caching:  # (else every call would return at once)
            for seq, n in out.scheduled:
                self.kv.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens + n)
        out.scheduled.sort(key=lambda e: e[1] != 1)  # stable: decodes first, order kept
        return out

    def _resume_tokens(self, seq: Sequence, budget: int) -> int:
        """The tokens a swapped-out sequence would come back with in a step of `budget` tokens
        left; 0 if it does not fit."""
        n = min(seq.num_uncomputed, budget) if self.config.enable_chunked_prefill else seq.num_uncomputed
        if n > budget or not self.policy.can_resume(seq, self.kv, seq.num_computed_tokens + n):
            return 0
        return n

    def _admit_tokens(self, seq: Sequence, budget: int,
                      affordable: Callable[[int, int], int] = lambda n, _: n) -> tuple[list[int], int, int]:
        """(prefix-cache hits, cached tokens, new tokens) that a waiting sequence would be
        admitted with in a step of `budget` tokens left; new tokens 0 if it does not fit."""
        hits, cached = self.kv.get_computed_blocks(seq.seq_id, seq.token_ids) if seq.seq_id not in self.kv.tables else ([], 0)
        n = seq.num_tokens - cached
        if self.config.enable_chunked_prefill:
            n = min(n, budget)
        elif n > budget:
            return hits, cached, 0
        n = affordable(n, cached)
        total = cached + n
        if n == 0 or not self.kv.can_allocate(seq.seq_id, total, hits, self._fork_blocks(seq, total)):
            return hits, cached, 0
        return hits, cached, n

    def admits_none(self, budget: int) -> bool:
        """Whether a step with `budget` tokens left after its running sequences would resume or
        admit nobody (the head of the swapped, or else of the queue, does not fit), with the KV
        as it is now. Fewer free blocks never admit more: it stays true while running sequences
        only grow (the simulator's fast-forward relies on this)."""
        if budget <= 0:
            return True
        if self.swapped:
            return self._resume_tokens(self.swapped[0], budget) == 0
        if self.waiting:
            return len(self.running) >= self.config.max_num_seqs or self._admit_tokens(self.waiting[0], budget)[2] == 0
        return True

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocate KV for n more tokens of a running sequence, preempting others if needed.
        False when the sequence itself had to be preempted."""
        total = seq.num_computed_tokens + n
        extra = self._fork_blocks(seq, total)
        if not extra and self.kv.holds(seq.seq_id, total):
            return True  # most decode steps: the last block has room
        while not self.kv.can_allocate(seq.seq_id, total, (), extra):
            candidates = [s for s in self.running if not s.in_flight and not s.paused]
            if not candidates:
                return False  # everything else is in flight: wait for a step to commit
            victim = select_victim(candidates)
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.kv.allocate(seq.seq_id, total)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [(s, k) for s, k in out.scheduled if s is not seq]
        if self.policy.preempt(seq, self.kv):
            seq.status = SeqStatus.SWAPPED
            self.swapped.append(seq)
        else:
            self._enqueue(seq, front=True)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _fork_blocks(self, seq: Sequence, total: int) -> int:
        """Blocks the n > 1 fork will take if this step completes the prompt."""
        if seq.pending_children and total >= seq.num_prompt_tokens:
            return seq.pending_children * int(seq.num_prompt_tokens % self.kv.page_size != 0)
        return 0

    # ------------------------------------------------------------------ after the step

    def fork_children(self, out: SchedulerOutput) -> list[tuple[Sequence, Sequence]]:
        """For each parent whose prompt this step completed, create its extra choices. They share
        the prompt's KV (copies of a partial last block go into out.block_copies, to run after
        the forward pass). Returns (parent, child) pairs; children are RUNNING."""
        pairs: list[tuple[Sequence, Sequence]] = []
        for parent, n in out.scheduled:
            if not parent.pending_children or parent.num_computed_tokens + n < parent.num_prompt_tokens:
                continue
            for i in range(1, parent.pending_children + 1):
                child = Sequence(seq_id=f"{parent.request_id}#{i}", request_id=parent.request_id,
                                 index=i, prompt_token_ids=parent.prompt_token_ids,
                                 params=child_params(parent.params, i),
                                 arrival_time=parent.arrival_time, priority=parent.priority,
                                 num_cached_tokens=parent.num_cached_tokens)
                child.order = next(self._order)
                child.num_computed_tokens = parent.num_prompt_tokens
                child.status = SeqStatus.RUNNING
                out.block_copies += self.kv.fork(parent.seq_id, child.seq_id, parent.num_prompt_tokens)
                self.running.append(child)
                pairs.append((parent, child))
            parent.pending_children = 0
        return pairs


def child_params(params: SamplingParams, i: int) -> SamplingParams:
    """The params of the i-th extra choice of n > 1: its own seed stream when seeded."""
    return params if params.seed is None else msgspec.structs.replace(params, seed=params.seed + i)
