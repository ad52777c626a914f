"""SLO-aware admission: a pure policy over plain numbers.

The front end keeps a `Ledger` of the requests it has handed to the engine: *pending* ones
(no token yet: queued or in prefill) and *running* ones (decoding). For each new request,
`AdmissionPolicy.decide` predicts its time to first token (TTFT) from the work ahead of it and
the step cost model, and says admit or reject (429, with a Retry-After drawn from the
prediction). `deadline` says when a pending request is shed.

Policies:
    fcfs      admit everything (vLLM's behaviour); only the queue caps reject; nothing is shed
    reject    FCFS order; reject a request predicted to miss the TTFT (or TPOT) SLO; shed
              pending requests past their TTFT deadline
    priority  as reject, but only work of equal or higher priority (lower value, vLLM's
              convention) is ahead of a request, and the engine orders its queue by priority
The queue caps (--max-queued-requests, --max-queued-tokens) hold under every policy.

The TTFT prediction replays the engine's scheduler on plain numbers, as a fluid: each step
gives the running sequences one decode token each and the rest of the token budget to the
prompts ahead, in queue order; a prompt waits for a free sequence slot first. Each running
sequence is assumed to run to its max_tokens (a pessimistic bound: EOS may come first). A busy
engine is in the middle of a step, which a new prompt cannot join: the replay starts with the
rest of that step, holding the decodes and the prompts that had arrived when it began (the
front end knows when it began from the worker's one message per step). The replay moves from
event to event (a prompt done, a sequence done), not step by step, so a decision costs
O((pending + running) log running). Step times come from `StepCostModel`.

What the replay leaves out (HTTP and IPC, tokenization, a step slower than any the cost model
has seen) is caught by `TtftCalibration`: it scales the prediction by how far measured TTFTs
ran past their predictions lately, so a request near the SLO is rejected at once with a 429
rather than admitted and then shed at its deadline.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field, replace

from kunlite.server.cost_model import StepCostModel

POLICIES = ("fcfs", "reject", "priority")


@dataclass(frozen=True)
class AdmissionConfig:
    policy: str = "fcfs"
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    max_num_seqs: int = 64  # the engine's: sequences decoding at once
    max_num_batched_tokens: int = 512  # the engine's: tokens per step

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--admission must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass
class InFlight:
    """One engine request as admission sees it."""

    prompt_tokens: int
    n: int
    max_tokens: int  # per choice
    priority: int = 0
    arrival: float = 0.0
    started: bool = False  # a first token came back: it is decoding, not pending
    generated: int = 0  # tokens per choice so far (the most of any choice)
    live_seqs: int = 0  # choices still running, once started
    choice_tokens: list[int] = field(default_factory=list)  # tokens of each choice, once started
    predicted_ttft: float | None = None  # seconds from arrival, the replay's (uncalibrated)
    instance: int = 0  # the engine instance serving it

    @property
    def remaining(self) -> int:
        return max(self.max_tokens - self.generated, 0)

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass
class Ledger:
    """The requests handed to the engine and not finished. Pending requests are kept in
    arrival order (dicts keep insertion order)."""

    requests: dict[str, InFlight] = field(default_factory=dict)

    def add(self, request_id: str, req: InFlight) -> None:
        self.requests[request_id] = req

    def on_tokens(self, request_id: str, index: int, num_new: int, finished: bool) -> bool:
        """Choice `index` produced `num_new` tokens (and maybe finished). True when this was
        the request's first output."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        first = not req.started
        if first:
            req.started, req.live_seqs, req.choice_tokens = True, req.n, [0] * req.n
        if 0 <= index < req.n:
            req.choice_tokens[index] += num_new
            req.generated = max(req.generated, req.choice_tokens[index])
        if finished:
            req.live_seqs = max(req.live_seqs - 1, 0)
        return first

    def remove(self, request_id: str) -> InFlight | None:
        return self.requests.pop(request_id, None)

    def pending(self, instance: int | None = None) -> list[InFlight]:
        """Requests with no token yet (on `instance`, or on any)."""
        return [r for r in self.requests.values() if not r.started and instance in (None, r.instance)]

    def running(self, instance: int | None = None) -> list[InFlight]:
        return [r for r in self.requests.values() if r.started and r.live_seqs > 0 and instance in (None, r.instance)]


@dataclass(frozen=True)
class Decision:
    admit: bool
    predicted_ttft: float  # seconds from arrival, calibrated: what the SLO is checked against
    reason: str | None = None  # slo_ttft | slo_tpot | queue_requests | queue_tokens
    message: str = ""
    retry_after: float | None = None  # seconds
    raw_ttft: float = 0.0  # seconds from arrival, the replay's alone: what calibration compares


@dataclass
class TtftCalibration:
    """Measured TTFT over predicted TTFT (both from arrival), for the latest requests.

    `factor` is a high quantile of those ratios, never below 1: a prediction multiplied by it
    is one that recent requests met `quantile` of the time. Only predictions of at least
    `min_predicted_s` count, since a request far below the SLO cannot miss it and its ratio is
    mostly fixed overhead. A request shed at its deadline counts with its waiting time, a lower
    bound of its TTFT, which is the conservative side."""

    min_predicted_s: float = 0.0
    window: int = 64
    quantile: float = 0.9
    max_factor: float = 4.0
    ratios: deque[float] = field(default_factory=deque)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        if predicted_s < max(self.min_predicted_s, 1e-3) or not measured_s >= 0.0:
            return
        self.ratios.append(min(measured_s / predicted_s, self.max_factor))
        while len(self.ratios) > self.window:
            self.ratios.popleft()

    @property
    def factor(self) -> float:
        if not self.ratios:
            return 1.0
        ordered = sorted(self.ratios)
        k = max(math.ceil(self.quantile * len(ordered)) - 1, 0)  # nearest-rank quantile
        return max(ordered[k], 1.0)


class _Replay:
    """The engine's queues as a fluid, advanced from event to event.

    Invariant: `heap` holds (done_at, context_at_zero) for each decoding sequence, where
    done_at is the value of `clock_steps` at which it emits its last token and its context
    is context_at_zero + clock_steps; `ctx0_sum` is the sum of the context_at_zero values."""

    def __init__(self, model: StepCostModel, cfg: AdmissionConfig, running: list[InFlight]) -> None:
        self.model, self.cfg = model, cfg
        self.clock_steps = 0  # steps replayed
        self.t = 0.0  # seconds replayed
        self.spare = 0  # prefill budget left in the last replayed step
        self.heap: list[tuple[int, int]] = []
        self.ctx0_sum = 0
        for r in running:
            for _ in range(r.live_seqs):
                self._push(r.remaining, r.context)

    def step_in_flight(self, pending: list[InFlight], now: float, step_start: float | None) -> list[InFlight]:
        """Replay the rest of the step the engine is running, which began at `step_start`
        (None: the engine is idle) with the decodes and the prompts of `pending` that were
        there by then (in order, as far as the budget goes). A new prompt cannot join it.
        Returns the pending requests still to prefill, less what this step computes."""
        if step_start is None:
            return pending
        budget = max(self.cfg.max_num_batched_tokens - len(self.heap), 0)
        rest, chunk, done = [], 0, []
        for r in pending:
            take = min(r.prompt_tokens, budget) if r.arrival <= step_start else 0
            budget -= take
            chunk += take
            if take and take == r.prompt_tokens:
                done.append(r)  # its first token comes at the end of this step
            else:
                rest.append(replace(r, prompt_tokens=r.prompt_tokens - take))
        duration = self._step(chunk)
        self.t += max(duration - (now - step_start), 0.0)  # an overdue step is about to end
        self._advance(1, 0, timed=False)
        for r in done:
            self._start_decoding(r)
        return rest

    def _start_decoding(self, req: InFlight) -> None:
        """`req` just got its first token: its n sequences decode the rest."""
        for _ in range(req.n):
            self._push(req.remaining - 1, req.prompt_tokens + 1)

    def _push(self, remaining: int, context: int) -> None:
        if remaining > 0:
            heapq.heappush(self.heap, (self.clock_steps + remaining, context - self.clock_steps))
            self.ctx0_sum += context - self.clock_steps

    def _context(self) -> int:
        return self.ctx0_sum + len(self.heap) * self.clock_steps

    def _step(self, prefill: int) -> float:
        return self.model.step_seconds(prefill, len(self.heap), self._context() + prefill)

    def _advance(self, steps: int, prefill_per_step: int, timed: bool = True) -> None:
        """Replay `steps` steps (no sequence finishes strictly inside them)."""
        if timed:
            self.t += steps * self._step(prefill_per_step)
        self.clock_steps += steps
        while self.heap and self.heap[0][0] <= self.clock_steps:
            _, ctx0 = heapq.heappop(self.heap)
            self.ctx0_sum -= ctx0

    def _until_next_finish(self) -> int:
        return self.heap[0][0] - self.clock_steps if self.heap else math.inf  # type: ignore[return-value]

    def prefill(self, req: InFlight) -> None:
        """Queue `req`'s prompt and replay until its first token; it then decodes."""
        while len(self.heap) >= self.cfg.max_num_seqs:  # wait for a free slot
            self.spare = 0
            self._advance(self._until_next_finish(), 0)
        left = req.prompt_tokens
        if self.spare and left:  # the rest of the budget of the last replayed step
            used = min(self.spare, left)
            self.t += self.model.step_seconds(used, 0, used) - self.model.step_seconds(0, 0, 0)
            self.spare -= used
            left -= used
        while left > 0:
            per_step = max(self.cfg.max_num_batched_tokens - len(self.heap), 1)
            need = math.ceil(left / per_step)
            k = min(need, self._until_next_finish())
            if k < need:  # a sequence finishes first: more budget for prompts after it
                self._advance(k, per_step)
                left -= k * per_step
                continue
            if k > 1:
                self._advance(k - 1, per_step)
            last = left - (k - 1) * per_step
            self._advance(1, last)
            self.spare, left = per_step - last, 0
        self._start_decoding(req)


class AdmissionPolicy:
    def __init__(self, cfg: AdmissionConfig, model: StepCostModel | None = None,
                 calibration: TtftCalibration | None = None) -> None:
        self.cfg = cfg
        self.model = model or StepCostModel()
        # Ratios from predictions under a quarter of the SLO say little about meeting it.
        self.calibration = calibration or TtftCalibration(min_predicted_s=0.25 * (cfg.slo_ttft_s or 0.0))

    def ahead_of(self, new: InFlight, pending: list[InFlight]) -> list[InFlight]:
        """The pending requests the engine will serve before `new`, in that order."""
        if self.cfg.policy != "priority":
            return pending
        ahead = [r for r in pending if r.priority <= new.priority]
        return sorted(ahead, key=lambda r: (r.priority, r.arrival))  # stable: FCFS among equals

    def predict_ttft(self, new: InFlight, running: list[InFlight], pending: list[InFlight],
                     now: float = 0.0, step_start: float | None = None, model: StepCostModel | None = None) -> float:
        """Seconds from `now` to `new`'s first token. `step_start`: when the engine's current
        step began (None: idle)."""
        replay = _Replay(model or self.model, self.cfg, running)
        rest = replay.step_in_flight(pending, now, step_start)
        for req in self.ahead_of(new, rest):
            replay.prefill(req)
        replay.prefill(new)
        # The step that computes the prompt's last chunk emits the first token: the end of
        # the last replayed step (possibly one replayed for the work ahead, if the prompt fit
        # in the budget it left).
        return replay.t

    def predict_tpot(self, new: InFlight, running: list[InFlight], model: StepCostModel | None = None) -> float:
        seqs = min(sum(r.live_seqs for r in running) + new.n, self.cfg.max_num_seqs)
        context = sum(r.context * r.live_seqs for r in running) + new.prompt_tokens * new.n
        return (model or self.model).step_seconds(0, seqs, context)

    def decide(self, new: InFlight, ledger: Ledger, now: float = 0.0, step_start: float | None = None, *,
                instance: int | None = None, model: StepCostModel | None = None) -> Decision:
        """Admit or reject `new`, which would run on `instance` (None: the only one), whose
        steps cost what `model` says (default: this policy's model). The queue caps count the
        whole server's queue."""
        running, pending = ledger.running(instance), ledger.pending(instance)
        model = model or self.model
        # From the request's arrival (tokenizing it took some of its budget), calibrated.
        raw = max(now - new.arrival, 0.0) + self.predict_ttft(new, running, pending, now, step_start, model)
        decision = self._judge(new, running, ledger.pending(), raw * self.calibration.factor, model)
        return replace(decision, raw_ttft=raw)

    def _judge(self, new: InFlight, running: list[InFlight], queued_all: list[InFlight], ttft: float,
               model: StepCostModel) -> Decision:
        cfg = self.cfg
        if cfg.max_queued_requests is not None and len(queued_all) + 1 > cfg.max_queued_requests:
            return Decision(False, ttft, "queue_requests",
                            f"the server is overloaded: {len(queued_all)} requests are queued "
                            f"(--max-queued-requests {cfg.max_queued_requests})", ttft)
        queued = sum(r.prompt_tokens for r in queued_all)
        if cfg.max_queued_tokens is not None and queued + new.prompt_tokens > cfg.max_queued_tokens:
            return Decision(False, ttft, "queue_tokens",
                            f"the server is overloaded: {queued} prompt tokens are queued and this "
                            f"request adds {new.prompt_tokens} (--max-queued-tokens {cfg.max_queued_tokens})",
                            ttft)
        if cfg.policy == "fcfs":
            return Decision(True, ttft)
        if cfg.slo_ttft_s is not None and ttft > cfg.slo_ttft_s:
            return Decision(False, ttft, "slo_ttft",
                            f"the server is overloaded: the predicted time to first token is "
                            f"{ttft * 1e3:.0f} ms, over the SLO of {cfg.slo_ttft_s * 1e3:.0f} ms",
                            ttft - cfg.slo_ttft_s)
        if cfg.slo_tpot_s is not None:
            tpot = self.predict_tpot(new, running, model)
            if tpot > cfg.slo_tpot_s and running:
                soonest = min(r.remaining for r in running)
                return Decision(False, ttft, "slo_tpot",
                                f"the server is overloaded: the predicted time per output token is "
                                f"{tpot * 1e3:.0f} ms, over the SLO of {cfg.slo_tpot_s * 1e3:.0f} ms",
                                soonest * model.step_seconds(0, sum(r.live_seqs for r in running)))
        return Decision(True, ttft)

    def deadline(self, arrival: float) -> float | None:
        """When a request that arrived at `arrival` is shed if it has no token yet."""
        if self.cfg.policy == "fcfs" or self.cfg.slo_ttft_s is None:
            return None
        return arrival + self.cfg.slo_ttft_s
