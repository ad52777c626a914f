"""One instance: a group of devices serving as one pipeline, seen from the scheduling side.

An instance owns its scheduler and the KV accounting of its members (`GroupKV`), and nothing
that touches a tensor. A step is three moves, so that a caller can keep several in flight:

    plan()    schedule a microbatch; returns one StageWork per member (or None)
    (the members run it: the first embeds, each passes hidden states on, the last samples)
    commit()  apply the last member's tokens: computed counts, forks, stops, outputs

A replica (one member) keeps one step in flight; a pipeline of K members keeps up to K, each
with an even share of the token budget and of the sequences, so that no stage idles while
another works. A sequence in a step that is not committed is `in_flight`: the scheduler leaves
it alone, and an abort of it takes effect when its step commits (its pages may still be written
until then).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kunlite.config import SchedulerConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.clock import REAL, Clock
from kunlite.engine.group_kv import GroupKV
from kunlite.engine.messages import ClusterEvent, EngineRequest, RequestOutput, StepTiming, TokenLogprobs
from kunlite.engine.microbatch import BubbleMeter, OnlineStepCost
from kunlite.engine.preemption import PreemptionPolicy
from kunlite.engine.scheduler import Scheduler, SchedulerOutput, child_params
from kunlite.engine.sequence import Sequence, SeqStatus
from kunlite.engine.step_cost import StepCostWeights
from kunlite.engine.work import (HostMoves, PageMoves, RemoteRows, RemoteServe, SampleRow, StageDone, StageWork, WorkSeq,
                                pack_pages)
from kunlite.sampling_params import SamplingParams


def eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """EOS ids from generation_config.json (int or list), else config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
            if ids:
                break
    return frozenset(ids)


def stop_reason(seq: Sequence, eos: frozenset[int], max_model_len: int) -> str | None:
    """Why the sequence ends after its latest token, or None. Stop strings are checked by the
    front end, on text."""
    p, token, n_out = seq.params, seq.output_token_ids[-1], len(seq.output_token_ids)
    if n_out >= p.min_tokens and ((not p.ignore_eos and token in eos) or token in p.stop_token_ids):
        return "stop"
    if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= max_model_len:
        return "length"
    return None


@dataclass
class Member:
    """A device of the instance: its rank, the layers it runs, and its KV accounting."""

    rank: int
    layers: tuple[int, int]
    kv: BlockManager


@dataclass
class _Flight:
    """A planned step that has not been committed."""

    sched: SchedulerOutput
    sampled: list[Sequence]  # sequences whose last token is sampled, in sample-row order
    last_rank: int  # the member whose StageDone commits it
    started: float  # clock.now() at plan
    prefill: int
    decode: int
    shape: list[tuple[int, int]]  # (new tokens, context) per sequence: the cost model's sample (of the last step)
    slowest: float = 0.0  # the slowest stage's compute seconds so far
    repeat: int = 1  # identical decode steps it stands for (the simulator's fast-forward; 1 in the engine)
    fitted: StepCostWeights | None = None  # the weights a refit due at its commit gives, if known (the simulator's)


class Instance:
    def __init__(self, iid: int, members: list[Member], config: SchedulerConfig, policy: PreemptionPolicy,
                 eos: frozenset[int], max_model_len: int, *, priority_order: bool = False,
                 step_ids: Iterator[int] | None = None, microbatch: str = "balanced", clock: Clock = REAL) -> None:
        self.id = iid
        self.clock = clock
        self.members = members
        self.config = config
        self.kv = GroupKV([m.kv for m in members])
        self.scheduler = Scheduler(config, self.kv, policy, priority_order=priority_order)  # type: ignore[arg-type]
        self.eos = eos
        self.max_model_len = max_model_len
        self.max_in_flight = len(members)
        self.flights: dict[int, _Flight] = {}
        self.timings: list[StepTiming] = []
        self.record_batches = False  # StepTiming.batch (--step-log)
        self.events: list[ClusterEvent] = []  # for the monitor's timeline; taken by the engine loop
        self._step_ids = step_ids or itertools.count()  # shared by a cluster's instances: ids are unique
        self._aborting: set[str] = set()  # seq ids aborted while in flight
        self._copies: list[tuple[int, int, int]] = []  # (member, src block, dst block) for the next step
        # Remote attention (a merged group): each member's scratch page, where rows whose KV is
        # on another member attend locally before their output is replaced. None: not allowed.
        self.scratch: dict[int, int] | None = None
        # Sequences whose KV may be on one member only (a merge's requests until their exchange:
        # kept, as a superset, by the parameter-centric policy); every other one is placed.
        self.maybe_unplaced: set[str] = set()
        self.remote_serves: list[tuple[int, RemoteServe]] = []  # (holder rank, what to serve): taken by the caller
        self.remote_calls = 0  # (step, stage, holder) remote attention exchanges planned
        self.microbatch = microbatch  # how a pipeline splits its work: balanced (by cost) or even
        self.step_cost = OnlineStepCost()
        self.bubbles = BubbleMeter(len(members))
        # False (the simulator: no device reads them): StageWork carries no page table, its
        # sample rows are placeholders (only their number counts), and its WorkSeqs are left
        # out unless remote attention needs them (the batch is the flight's shape)
        self.payload = True
        self.first_planned: float | None = None  # perf_counter of its first own step: plan and commit
        self.first_committed: float | None = None
        self._own_steps: set[int] = set()

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest) -> None:
        self.scheduler.add(Sequence(seq_id=req.request_id, request_id=req.request_id, index=0,
                                    prompt_token_ids=list(req.prompt_token_ids), params=req.params,
                                    arrival_time=req.arrival_time, priority=req.priority,
                                    pending_children=req.params.n - 1))

    def abort(self, request_ids: list[str], choices: list[tuple[str, int]] = ()) -> list[RequestOutput]:
        """End whole requests, or single choices of them; their KV is freed at once, or when
        the step they are in commits."""
        wanted = set(choices)
        outs = []
        for rid in set(request_ids) | {rid for rid, _ in wanted}:
            for seq in self.scheduler.find(rid):
                if rid in request_ids or (rid, seq.index) in wanted:
                    if seq.in_flight:
                        self._aborting.add(seq.seq_id)
                    else:
                        self.scheduler.finish(seq, "abort")
                        outs.append(output_of(seq, []))
        return outs

    def finish_aborted(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Aborts that waited for these sequences' transfers to land take effect now."""
        outs = []
        for seq in seqs:
            if seq.seq_id in self._aborting:
                self._aborting.discard(seq.seq_id)
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                    outs.append(output_of(seq, []))
        return outs

    def fail(self, reason: str = "error") -> list[RequestOutput]:
        """End every request with `reason` (a member died) and free all their KV."""
        outs = []
        sched = self.scheduler
        for seq in list(sched.running) + list(sched.swapped) + list(sched.waiting):
            seq.in_flight = False
            self.scheduler.finish(seq, reason)
            outs.append(output_of(seq, []))
        self.flights.clear()
        self._aborting.clear()
        self._copies.clear()
        return outs

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_stages(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ plan

    def can_plan(self) -> bool:
        """A step could be planned now: a slot is free, and a sequence waits, is swapped out or
        runs outside every step in flight (else plan() would find nothing)."""
        sched = self.scheduler
        return len(self.flights) < self.max_in_flight and \
            bool(sched.waiting or sched.swapped or any(not s.in_flight for s in sched.running))

    def decode_only(self, queued: bool = False, pipeline: bool = False) -> list[Sequence] | None:
        """The running sequences, if the next step would be exactly one decode of each of them
        (a replica with nothing waiting, swapped, in flight, paused, mid-prompt or forking,
        no copies or aborts pending, all within the step's seats and budget); else None.
        With `queued`, sequences may wait or be swapped out: the caller asks
        `Scheduler.admits_none` once the step's KV is allocated. With `pipeline`, the
        instance may have several members and steps in flight, and every running sequence,
        in one or not, is a decode (nothing waits, none unplaced): its next microbatches are
        decodes (the simulator's pipeline windows choose which)."""
        sched, cfg = self.scheduler, self.config
        if (((len(self.members) > 1 or self.flights) and not pipeline) or (pipeline and self.maybe_unplaced)
                or self._copies or self._aborting or self.scratch is not None
                or (not queued and (sched.waiting or sched.swapped)) or not sched.running
                or len(sched.running) > min(cfg.max_num_seqs, cfg.max_num_batched_tokens)):
            return None
        for s in sched.running:
            if (s.in_flight and not pipeline) or s.paused or s.num_uncomputed != 1 or s.pending_children:
                return None
        return list(sched.running)

    def commits(self, done: StageDone) -> bool:
        """Whether `done` is the StageDone that commits one of this instance's steps."""
        flight = self.flights.get(done.step_id)
        return flight is not None and flight.last_rank == done.rank

    def plan(self, repeat: int = 1) -> list[StageWork] | None:
        """Schedule the next microbatch; one StageWork per member, or None if nothing can run.
        `repeat` > 1 (the simulator only): the step stands for that many decode steps of the
        same sequences, committed at once; the caller has checked that the scheduler would
        run exactly these, that their KV for all of them is allocated, and that none ends
        before the last."""
        K = self.num_stages
        even = max(self.config.max_num_batched_tokens // K, 1)  # an even microbatch's token budget
        if K > 1 and self.microbatch == "balanced":
            # Look ahead: a microbatch carries a K-th of the predicted cost of what could run now;
            # a prompt in progress gets no shorter a chunk than `even` would give it: cut to a
            # K-th of the work left, a 539-token prompt ran in 11 chunks,
            # 269, 134, 67, ..., 1, one pipeline pass each, and waited for its first token.
            fit = self.step_cost
            limit = fit.split(fit.predict_features(*self._round()), K)
            sched = self.scheduler.schedule(cost=fit.predict, cost_limit=limit, min_chunk=even)
        else:
            # Each microbatch takes an even share of the running sequences and of the budget.
            share = max(math.ceil(len(self.scheduler.running) / K), 1) if K > 1 else None
            sched = self.scheduler.schedule(budget=even, max_running=share)
        now = self.clock.wall()
        for seq in sched.preempted:
            kind = "swap_out" if seq.status is SeqStatus.SWAPPED else "preemption"
            self.events.append(ClusterEvent(now, kind, self.id, seq.seq_id))
        self.events += [ClusterEvent(now, "swap_in", self.id, seq.seq_id) for seq in sched.resumed]
        if not sched.scheduled:
            return None
        step_id = next(self._step_ids)
        for seq, _ in sched.scheduled:
            seq.in_flight = True
        # (the simulator needs them only for remote attention; it reads the batch off the flight)
        seqs = [WorkSeq(s.seq_id, s.num_computed_tokens, s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n])
                for s, n in sched.scheduled] \
            if self.payload or any(s.seq_id in self.maybe_unplaced for s, _ in sched.scheduled) else []
        sampled = [s for s, n in sched.scheduled if s.num_computed_tokens + n == len(s.token_ids)]  # (num_tokens)
        rows = self._sample_rows(sched, sampled)
        copies, self._copies = self._copies, []
        works = []
        take_moves = getattr(self.scheduler.policy, "take_moves", None)
        for i, m in enumerate(self.members):
            remote = self._remote_rows(step_id, m, sched, seqs)
            table, shape = pack_pages(self._page_table(m, sched, {r for rr in remote for r in rr.rows})) \
                if self.payload else (b"", (0, 0, 0))
            src, dst = ([], []) if not copies else \
                (x.tolist() for x in m.kv.page_copies([(s, d) for j, s, d in copies if j == i]))
            swap_out, swap_in = take_moves(i) if take_moves else (HostMoves(), HostMoves())
            works.append(StageWork(
                step_id=step_id, instance=self.id, stage=i, num_stages=K,
                prev_rank=self.members[i - 1].rank if i > 0 else -1,
                next_rank=self.members[i + 1].rank if i + 1 < K else -1,
                seqs=seqs, num_decodes=sched.num_decodes, page_table=table, table_shape=shape,
                samples=rows if i == K - 1 else [], copies=PageMoves(src, dst),
                swap_out=swap_out, swap_in=swap_in, remote=remote))
        prefill = sum(n for _, n in sched.scheduled if n > 1)
        now = self.clock.now()
        self.bubbles.started(now)
        self.flights[step_id] = _Flight(sched, sampled, self.members[-1].rank, now, prefill,
                                        sched.num_batched_tokens - prefill,
                                        [(n, s.num_computed_tokens + repeat - 1) for s, n in sched.scheduled],
                                        repeat=repeat)
        if self.first_planned is None:
            self.first_planned = self.clock.now()
            self._own_steps.add(step_id)
        return works

    def _page_table(self, m: Member, sched: SchedulerOutput, remote: set[int] = frozenset()) -> np.ndarray:
        """(L_m, B, max_blocks) pages of member m for the scheduled sequences; each row is padded
        with its own first block, so that every entry names a real page of these layers. A row
        in `remote` names the scratch page throughout."""
        ps = self.members[0].kv.page_size
        scratch = (self.scratch or {}).get(m.rank, -1)
        lengths = [len(m.kv.tables[s.seq_id]) if r not in remote else -(-(s.num_computed_tokens + n) // ps)
                   for r, (s, n) in enumerate(sched.scheduled)]
        width = max(lengths)
        L = m.layers[1] - m.layers[0]
        out = np.empty((L, len(lengths), width), dtype=np.int32)  # (L_m, B, max_blocks)
        for r, (s, _) in enumerate(sched.scheduled):
            if r in remote:
                out[:, r, :] = scratch
                continue
            t = m.kv.tables[s.seq_id]
            ids = np.asarray(t + [t[0]] * (width - len(t)), dtype=np.int64)[None, :]  # (1, max_blocks)
            out[:, r, :] = m.kv.page_table(ids, m.layers)[:, 0, :]
        return out

    def _remote_rows(self, step_id: int, m: Member, sched: SchedulerOutput, seqs: list[WorkSeq]) -> list[RemoteRows]:
        """The rows whose KV of m's layers is on another member, by holder; each holder is told
        what to serve (`remote_serves`)."""
        if not self.maybe_unplaced:
            return []
        by_holder: dict[int, list[int]] = {}
        maybe = [r for r, (s, _) in enumerate(sched.scheduled) if s.seq_id in self.maybe_unplaced]
        if not maybe:
            return []
        here = m.kv.covers_many([sched.scheduled[r][0].seq_id for r in maybe], m.layers)  # (len(maybe),)
        for r, ok in zip(maybe, here):
            s = sched.scheduled[r][0]
            if ok:
                continue
            holder = next((h for h in self.members if s.seq_id in h.kv.tables and h.kv.covers(s.seq_id, m.layers)),
                          None)
            if holder is None or self.scratch is None:
                raise RuntimeError(f"{s.seq_id} has no KV for layers {m.layers} in instance {self.id}")
            by_holder.setdefault(holder.rank, []).append(r)
        out = []
        for rank, rows in by_holder.items():
            holder = next(h for h in self.members if h.rank == rank)
            tables = [holder.kv.tables[sched.scheduled[r][0].seq_id] for r in rows]
            width = max(len(t) for t in tables)
            ids = np.array([t + [t[0]] * (width - len(t)) for t in tables], dtype=np.int64)  # (R, max_blocks)
            table, shape = pack_pages(holder.kv.page_table(ids, m.layers))
            decodes = sum(1 for r in rows if len(seqs[r].tokens) == 1)
            self.remote_serves.append((rank, RemoteServe(step_id, m.rank, m.layers, [seqs[r] for r in rows], decodes,
                                                         table, shape)))
            out.append(RemoteRows(rank, rows))
            self.remote_calls += m.layers[1] - m.layers[0]
        return out

    def _round(self) -> tuple[int, int, int]:
        """The step_features (T, A, B) of a round of the pipeline's work: the next tokens of
        every running sequence (in flight or not: each microbatch carries its share of all of
        them), then the queue's prompts in order, within the whole budget; a decode of an
        empty context if there is none."""
        t = a = b = 0
        budget = self.config.max_num_batched_tokens
        for s in self.scheduler.running:
            if not s.paused and budget > 0:
                c = s.num_computed_tokens
                n = max(len(s.token_ids) - c, 1)  # num_uncomputed (0: a step of it in flight still counts)
                if n > budget:
                    n = budget
                t, a, b = t + n, a + n * c + n * (n + 1) // 2, b + 1
                budget -= n
        for s in self.scheduler.waiting:
            if budget <= 0:
                break
            n = min(s.num_tokens, budget)
            t, a, b = t + n, a + n * (n + 1) // 2, b + 1
            budget -= n
        return (t, a, b) if b else (1, 1, 1)

    def observe_stage(self, done: StageDone) -> None:
        """A member finished its share of a step: its compute time counts for the cost model
        and the bubble meter."""
        flight = self.flights.get(done.step_id)
        if flight is not None:
            flight.slowest = max(flight.slowest, done.seconds)
            self.bubbles.stage_done(done.seconds)

    def _sample_rows(self, sched: SchedulerOutput, sampled: list[Sequence]) -> list[SampleRow]:
        """One row per sampled sequence, then one per extra choice forked in this step (in the
        order `Scheduler.fork_children` will create them), sharing its parent's logits."""
        if not self.payload:
            forks = sum(p.pending_children for p, n in sched.scheduled
                        if p.pending_children and p.num_computed_tokens + n >= p.num_prompt_tokens)
            return [_PLACEHOLDER_ROW] * (len(sampled) + forks)
        index = {id(s): i for i, (s, _) in enumerate(sched.scheduled)}
        rows = [sample_row(index[id(s)], s.params, s) for s in sampled]
        for parent, n in sched.scheduled:
            if parent.pending_children and parent.num_computed_tokens + n >= parent.num_prompt_tokens:
                for i in range(1, parent.pending_children + 1):
                    rows.append(sample_row(index[id(parent)], child_params(parent.params, i), parent, step_index=0))
        return rows

    # ------------------------------------------------------------------ commit

    def commit(self, done: StageDone, steps: int | None = None) -> list[RequestOutput]:
        """The last member finished step `done.step_id`: apply its tokens. `steps` (the
        simulator only, for a flight that stands for more decode steps): apply the first
        `steps` of them; the flight stays in flight for the rest."""
        flight = self.flights[done.step_id]
        if steps is not None and steps < flight.repeat:
            flight.repeat -= steps
            k = steps
        else:
            self.observe_stage(done)
            del self.flights[done.step_id]
            k = flight.repeat
            if self.num_stages > 1:  # only a pipeline splits microbatches by cost (a merged group starts its own fit)
                self.step_cost.observe(flight.shape, flight.slowest, flight.fitted)  # of its last step, when it stands for k
            if not self.flights:
                self.bubbles.idle(self.clock.now())
            if done.step_id in self._own_steps and self.first_committed is None:
                self.first_committed = self.clock.now()
        sched = flight.sched
        part = done.step_id in self.flights  # decodes only: no forks, copies or aborts to settle yet
        for seq, n in sched.scheduled:
            seq.num_computed_tokens += n * k  # k > 1: decodes only (n == 1)
            seq.in_flight = part
        pairs = self.scheduler.fork_children(sched)
        self.maybe_unplaced.update(c.seq_id for p, c in pairs if p.seq_id in self.maybe_unplaced)  # shared blocks
        self._copies += sched.block_copies  # (member, src, dst): before the children's next step
        rows = flight.sampled + [child for _, child in pairs]
        outputs = []
        for r, seq in enumerate(rows):
            if seq.seq_id in self._aborting:
                continue
            seq.append_token(done.tokens[r], k)
            reason = stop_reason(seq, self.eos, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            lp = done.logprobs[r] if done.logprobs is not None else None
            outputs.append(output_of(seq, [done.tokens[r]] * k, [lp] if lp is not None else None))
        for seq, _ in sched.scheduled if not part else ():
            if seq.seq_id in self._aborting:
                self._aborting.discard(seq.seq_id)
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                    outputs.append(output_of(seq, []))
        context = sum(s.num_computed_tokens for s, _ in sched.scheduled)  # KV lengths after the step
        now = self.clock.now()
        self.timings.append(StepTiming(flight.prefill, flight.decode, context, now - flight.started, self.id,
                                       flight.started, now, self.num_stages,
                                       flight.shape if self.record_batches else None))
        return outputs

    def swap_counters(self, page_bytes: int) -> dict[str, int]:
        """The swap policy's cumulative counts (zeros under recompute), for EngineStats."""
        p = self.scheduler.policy
        return {"num_swaps_out_total": getattr(p, "num_out", 0), "num_swaps_in_total": getattr(p, "num_in", 0),
                "swap_out_bytes_total": getattr(p, "pages_out", 0) * page_bytes,
                "swap_in_bytes_total": getattr(p, "pages_in", 0) * page_bytes}

    # ------------------------------------------------------------------ merging and splitting

    def placed(self, seq: Sequence) -> bool:
        """Whether every member holds the sequence's KV for the layers it runs (or the sequence
        holds no KV yet): it can run in this pipeline without help."""
        return not self.unplaced([seq])

    def unplaced(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences of `seqs`, in order, that are not placed(): one covers_many per member
        for all of them (a merged group asks this of thousands at every tick)."""
        holding = [s for s in seqs if s.seq_id in self.kv.tables]
        if not holding:
            return []
        ids = [s.seq_id for s in holding]
        here = np.ones(len(ids), dtype=bool)  # (n,)
        for m in self.members:
            here &= m.kv.covers_many(ids, m.layers)
        return [s for s, ok in zip(holding, here) if not ok]

    def absorb(self, parts: list["Instance"]) -> None:
        """Take over the sequences, the steps in flight and the pending records of instances
        merging into this one (their KV stays on their devices, which are members here).
        Queues keep FCFS (or priority) order across the parts."""
        sched = self.scheduler
        for p in parts:
            sched.running += p.scheduler.running
            sched.waiting += p.scheduler.waiting
            sched.swapped += p.scheduler.swapped
            sched.num_preemptions += p.scheduler.num_preemptions
            self.flights.update(p.flights)  # they commit here, on the rank they were sent to
            self._aborting |= p._aborting
            ranks = {i: m.rank for i, m in enumerate(p.members)}
            mine = {m.rank: i for i, m in enumerate(self.members)}
            self._copies += [(mine[ranks[i]], s, d) for i, s, d in p._copies]
            self.events += p.events
            self.timings += p.timings
        sched.running.sort(key=lambda s: (s.arrival_time, s.order))
        sched.waiting.sort(key=Sequence.priority_key if sched.priority_order else lambda s: (s.arrival_time, s.order))
        for seq in sched.running + sched.waiting + sched.swapped:  # one order in this scheduler
            seq.order = next(sched._order)

    def take_events(self) -> list[ClusterEvent]:
        out, self.events = self.events, []
        return out

    def take_timings(self) -> list[StepTiming]:
        out, self.timings = self.timings, []
        return out


_PLACEHOLDER_ROW = SampleRow(-1, SamplingParams(), 0)  # a row nobody samples (Instance.payload False)


def output_of(seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
    return RequestOutput(seq.request_id, seq.index, tokens, logprobs, seq.finish_reason,
                         seq.num_prompt_tokens, seq.num_cached_tokens)


def sample_row(seq_index: int, params, seq: Sequence, step_index: int | None = None) -> SampleRow:  # type: ignore[no-untyped-def]
    """A sample row; token histories travel only when the row's penalties need them."""
    step = len(seq.output_token_ids) if step_index is None else step_index
    penalties = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    if not penalties:
        return SampleRow(seq_index, params, step)
    outputs = list(seq.output_token_ids) if step_index is None else []
    return SampleRow(seq_index, params, step, list(seq.prompt_token_ids), outputs)

