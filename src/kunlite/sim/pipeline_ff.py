"""Fast-forward of a static pipeline's decode steps (the simulator only): a window of streams.

A pipeline instance of K stages keeps K microbatches in flight, one per *slot*: when a slot's
step commits, the instance plans its next one, and the `balanced` microbatching takes the
oldest running sequences not in flight while their predicted cost fits a K-th of the round's
(`Instance.plan`, `Scheduler.schedule(cost=, cost_limit=)`). While nothing arrives and no
sequence ends, a slot mostly takes the same sequences again, step after step: a *stream*. A
stream's steps can be one flight of several decode steps, as a replica's
(`FastForward._steps_ahead`), provided every plan among them is the one the scheduler would
make at its time.

`plan_window` checks that by running the streams ahead on plain numbers, commit by commit in
time order: each commit feeds a copy of the instance's online cost fit (as `Instance.commit`
does), each plan's choice is predicted from the contexts, the sequences in flight and the fit
as they then are (`Shares.choice`, the scheduler's rule for a round of decodes), its KV
counted, and its stages timed as `SimCluster._stage` times them (a device runs its stages in
the order they were planned; a stage after the first waits for the previous one's activations
over the link). When a slot's plan takes other sequences than its last, a new stream follows
the old one in that slot; so does one when a sequence of its stream ends (its last token
commits; it leaves the running sequences, and the round, there). The window ends at the
first commit after which the KV would run out (counting none that ending sequences free: a
flight takes its KV when it is planned), a stream would have FAST_FORWARD_STEPS steps, a
slot would have nothing to run, or another microbatch would be planned at once. It pauses
at the first commit from the next arrival on (the request may come to this instance, and
its next plan take it); if the request goes to another instance, it resumes up to the
arrival after (`Window.extend`), its streams' flights growing by the steps planned since.
Each stream's window steps become one flight, planned (and checked against the real
scheduler) when the step it follows commits; the observations of the cost fit are replayed
in commit order with the weights found here (`OnlineStepCost.observe_features(fitted=)`).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from kunlite.engine.instance import Instance
from kunlite.engine.microbatch import OnlineStepCost
from kunlite.engine.step_cost import StepCostWeights


@dataclass(slots=True)
class Step:
    time: float  # when it is planned (its stream's previous step commits then)
    ends: list[float]  # when each stage ends; the last: its commit
    seconds: list[float]  # each stage's compute time


@dataclass(slots=True)
class Stream:
    seq_ids: list[str]  # its sequences, in running order
    positions: list[int]  # their places in the scheduler's running list at the window's start
    commit: float  # when its step in flight commits
    features: tuple[int, int, int, int]  # that step's step_features (what the commit observes)
    slowest: float  # that step's slowest stage
    step_id: int | None  # its step in flight at the window's start (None: it plans in the window)
    steps: list[Step] = field(default_factory=list)  # its window steps
    prev: int | None = None  # the stream it follows in its microbatch slot, when that took other sequences
    hidden_seconds: float = 0.0  # its activations over the link between two stages
    seconds_at: list[Any] = field(default_factory=list)  # per stage: context sum -> a step's seconds


@dataclass(slots=True)
class Observation:
    time: float  # the commit
    features: tuple[int, int, int, int]
    slowest: float
    fitted: StepCostWeights | None  # the fit's weights after it
    stream: int
    j: int  # the step's index among its stream's window steps; -1: the step in flight at the start


@dataclass(slots=True)
class Window:
    instance: int
    streams: list[Stream]  # [0]: the stream planning at the start; then those in flight; then followers
    observations: list[Observation]  # in commit order
    busy: dict[int, float]  # rank -> when its last window stage ends
    final: list[int]  # per stream: the index of its last window step that runs (-1: none)
    flights: dict[int, int] = field(default_factory=dict)  # stream -> step id of its flight, once planned
    applied: int = 0  # observations replayed (or left to a commit) so far
    live: int = 0  # flights planned and not yet committed to their end
    horizon: float = math.inf  # it paused at its first commit from here on (an arrival)
    resume: Generator[None, float, None] | None = None  # its planning, paused there (None: it ended)
    # Streams not flown, from stream `_seen` down (`pending` reads these, not every stream of
    # a long window): a flight is never taken back, so a flown stream leaves for good
    _unflown: list[int] = field(default_factory=list)
    _seen: int = 0

    def extend(self, horizon: float) -> None:
        """The arrival at `self.horizon` went to another instance: plan on, up to the first
        commit from `horizon` on. Streams get more window steps (`final` is the caller's)."""
        assert self.resume is not None and horizon > self.horizon
        self.horizon = horizon
        try:
            self.resume.send(horizon)
        except StopIteration:
            self.resume = None

    def pending(self) -> list[int]:
        """The streams whose window steps are still to be planned (when their step in flight
        commits, or the last step of the stream they follow)."""
        if len(self.streams) > self._seen:
            self._unflown += range(self._seen, len(self.streams))
            self._seen = len(self.streams)
        flights, final = self.flights, self.final
        self._unflown = [u for u in self._unflown if u not in flights]
        return [u for u in self._unflown if final[u] >= 0]

    def after(self, u: int) -> int | None:
        """The step whose commit plans stream u's steps (None: not known yet)."""
        stream = self.streams[u]
        if stream.prev is None:
            return stream.step_id
        if not self.streams[stream.prev].steps:  # it took other sequences at its first plan
            return self.after(stream.prev)
        return self.flights.get(stream.prev)


class Shares:
    """What `Scheduler.schedule(cost=fit.predict, cost_limit=...)` weighs for a pipeline's
    microbatch when every running sequence decodes: each one's share of a step's cost (one new
    token on its context), the per-step base, and the limit (a `stages`-th of the round's:
    `Instance._round` when every running sequence decodes; `live` of them run still). The
    scheduler's floats: a share is recomputed when its context grows or the fit is refitted."""

    def __init__(self, fit: OnlineStepCost, ctx: list[int], stages: int) -> None:
        self.fit, self.ctx, self.stages = fit, ctx, stages
        self.live = len(ctx)
        self.weights: StepCostWeights | None = None
        self.shares: list[float] = []
        self.base = 0.0

    def refresh(self, grown: list[int]) -> None:
        """The contexts of these running positions grew (and the fit may have refitted)."""
        fit, ctx = self.fit, self.ctx
        if fit.weights is not self.weights or not self.shares:
            self.weights, self.base = fit.weights, fit.predict_features(0, 0, 0)
            grown = range(len(ctx))  # type: ignore[assignment]
            self.shares = [0.0] * len(ctx)
        shares, base, w = self.shares, self.base, self.weights
        if w is None:  # a sequence's worth per step
            for i in grown:
                shares[i] = fit.predict_features(1, ctx[i] + 1, 1) - base
            return
        # fit.predict_features(1, ctx + 1, 1) - base: StepCostWeights.predict_features's
        # operations in its order (x * 1 is x), without two calls per sequence
        pt, pa, pq, p0 = w.per_token, w.per_attention_pair, w.per_sequence, w.per_step
        for i in grown:
            shares[i] = pt + pa * (ctx[i] + 1) + pq + p0 - base

    def choice(self, ctx_sum: int, in_flight: list[bool], seats: int, budget: int) -> list[int]:
        """The running positions the scheduler takes for the microbatch (the live ones'
        contexts summing to ctx_sum): the oldest not in flight (nor ended), while the cost
        spent so far plus the next one's share stays within the limit (the first always),
        within the seats and the token budget. The same floats as the scheduler's, in the
        same order."""
        n, fit, w = self.live, self.fit, self.fit.weights
        if w is None:
            limit = fit.split(fit.predict_features(n, ctx_sum + n, n), self.stages)
        else:  # the same: predict_features' then split's operations in their order (x * 1 is x)
            p0 = w.per_step
            limit = (w.per_token * n + w.per_attention_pair * (ctx_sum + n) + w.per_sequence * n + p0 - p0) / \
                self.stages + p0
        out: list[int] = []
        take = min(seats, budget)  # each one takes a seat and a token of the budget
        if take <= 0:
            return out
        spent, shares = self.base, self.shares
        for i, busy in enumerate(in_flight):
            if busy:
                continue
            share = shares[i]
            if out and not spent + share <= limit:
                break
            out.append(i)
            spent += share
            if len(out) == take:
                break
        return out


def plan_window(inst: Instance, now: float, in_flight: list[Stream], left: list[int], busy: dict[int, float],
                cost: Any, link_seconds: Any, token_bytes: int, max_steps: int, horizon: float,
                may_grow: bool = True) -> Window | None:
    """The window of a pipeline instance that plans a microbatch now, with `in_flight` its
    streams in flight (each at its last step); `left[i]`: commits until running sequence i ends.
    Nothing is planned from `horizon` on (the next arrival) until `Window.extend` says that it
    went to another instance. None if the planning stream gets no step, or the window
    fewer than 2K steps before it ends (or pauses, unless it `may_grow`: the request may go
    to another instance)."""
    sched, cfg = inst.scheduler, inst.config
    K = inst.num_stages
    running = list(sched.running)  # as the window began (ending sequences leave the scheduler's)
    n = len(running)  # (decode_only: within the seats and the budget, so the round holds every decode)
    kv = inst.members[0].kv
    ps = kv.page_size
    ctx = [s.num_computed_tokens for s in running]
    cap = [len(kv.tables[s.seq_id]) * ps for s in running]  # tokens their blocks hold, alike on every member
    free = inst.kv.num_free_blocks
    busy_seq = [False] * n
    for u in in_flight:
        for i in u.positions:
            busy_seq[i] = True
    fit = inst.step_cost.copy()
    seats, budget = cfg.max_num_seqs, cfg.max_num_batched_tokens
    ctx_sum = sum(ctx)
    shares = Shares(fit, ctx, K)
    shares.refresh([])
    first = shares.choice(ctx_sum, busy_seq, seats, budget)
    if not first or (len(in_flight) + 1 < K and n - sum(busy_seq) > len(first)):
        return None  # nothing to plan, or another microbatch would be planned at once
    streams = [Stream([running[i].seq_id for i in first], first, 0.0, (0, 0, 0, 1), 0.0, None)] + in_flight
    ranks = [m.rank for m in inst.members]
    layers = [m.layers for m in inst.members]
    busy = {r: busy[r] for r in ranks}
    at = getattr(cost, "decode_seconds_at", None)  # the same floats as step_seconds, without the batches
    used = 0

    def plan(u: Stream, t: float) -> bool:
        nonlocal used
        j = len(u.steps)
        if j >= max_steps:
            return False
        add = c = 0
        pos = u.positions
        for i in pos:  # (a failed plan ends the window: what it marks busy is not read again)
            x = ctx[i]
            c += x  # its contexts now: c0 + m * j
            if x >= cap[i]:  # its next token takes a block (one: its blocks hold its computed tokens)
                add += 1
            busy_seq[i] = True
        if used + add > free:
            return False  # the step-by-step run would preempt here
        used += add
        if add:
            for i in pos:
                if ctx[i] >= cap[i]:
                    cap[i] += ps
        m = len(pos)
        if j == 0:
            u.hidden_seconds = link_seconds(m * token_bytes)
            if at is not None:
                u.seconds_at = [at(m, lay) for lay in layers]
        if at is not None:
            secs = [f(c) for f in u.seconds_at]
        else:
            secs = [cost.step_seconds([(1, ctx[i]) for i in pos], lay) for lay in layers]
        ends, prev, hidden = [], 0.0, u.hidden_seconds
        for s, r in enumerate(ranks):  # as SimCluster._stage times each stage's work
            start = busy[r]
            if t >= start:
                start = t
            if s and prev + hidden > start:
                start = prev + hidden
            prev = start + secs[s]
            busy[r] = prev
            ends.append(prev)
        u.steps.append(Step(t, ends, secs))
        u.commit, u.features, u.slowest = prev, (m, c + m, m, 1), max(secs)
        return True

    plan(streams[0], now)
    observations: list[Observation] = []

    def advance() -> Generator[None, float, None]:
        """Commit by commit, in time order, until the window ends (returns); at a commit from
        the horizon on it pauses (yields) until it is sent a later horizon."""
        nonlocal ctx_sum, horizon
        active = list(range(len(streams)))  # the stream of each microbatch slot now
        while True:
            ui = active[0]
            for k in active:  # the first of the earliest, as min()
                if streams[k].commit < streams[ui].commit:
                    ui = k
            u = streams[ui]
            t = u.commit
            ended = 0
            for i in u.positions:
                ctx[i] += 1
                left[i] -= 1
                if left[i] > 0:
                    busy_seq[i] = False
                else:  # its last token: it leaves the running sequences (in flight for good, here)
                    ctx_sum -= ctx[i]
                    ended += 1
            ctx_sum += len(u.positions)
            shares.live -= ended
            fit.observe_features(u.features, u.slowest)
            observations.append(Observation(t, u.features, u.slowest, fit.weights, ui, len(u.steps) - 1))
            while t >= horizon:  # a request may come to this instance, and this plan take it
                horizon = yield
            shares.refresh(u.positions)
            choice = shares.choice(ctx_sum, busy_seq, seats, budget)
            if not choice:
                return  # the slot has nothing to run
            if choice != u.positions:  # the slot takes other sequences from now on: a stream of its own
                if len(active) < K and n - sum(busy_seq) > len(choice):
                    return  # and another microbatch would be planned at once
                streams.append(Stream([running[i].seq_id for i in choice], choice, 0.0, (0, 0, 0, 1), 0.0, None,
                                      prev=ui))
                active[active.index(ui)] = ui = len(streams) - 1
                u = streams[ui]
            if not plan(u, t):
                return

    resume: Generator[None, float, None] | None = advance()
    try:
        next(resume)  # type: ignore[arg-type]
    except StopIteration:
        resume = None
    if not streams[0].steps or ((resume is None or not may_grow) and sum(len(u.steps) for u in streams) < 2 * K):
        return None  # (a short window that has paused may grow, if the request goes elsewhere)
    return Window(inst.id, streams, observations, busy, [len(u.steps) - 1 for u in streams], horizon=horizon,
                  resume=resume)
