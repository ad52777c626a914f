"""What one server holds for its whole life: the engine client, the tokenizer, admission
(policy + ledger), metrics, and the server's status.

Loading happens in the background after the HTTP server is up, so that /health can answer
503 until the model is loaded:  loading -> ready, then -> dead if the worker goes away;
loading -> failed if the model cannot be loaded (the server then exits, see `on_fatal`).

`on_engine_outputs` is the one place where every engine message is accounted for (gauges,
token counters, latencies, the cost model, the admission ledger), whoever consumes the
outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kunlite.engine.args import EngineOptions
from kunlite.engine.cluster.dispatch import InstanceLoad, blocks_for, choose_instance
from kunlite.engine.messages import ACCEPTING_STATES, ClusterEvent, EngineOutputs, InstanceStats
from kunlite.engine.tokenizer import Tokenizer
from kunlite.server.admission import AdmissionConfig, AdmissionPolicy, Ledger
from kunlite.server.cost_model import StepCostModel
from kunlite.server.engine_client import EngineClient
from kunlite.server.metrics import ServerMetrics
from kunlite.server.window import RecentServing

log = logging.getLogger("kunlite.server")

EVENTS_KEPT = 1000  # cluster events /v1/cluster can show


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineOptions = EngineOptions()
    served_model_names: tuple[str, ...] = ()  # empty: derived from --model
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: none
    timeout_headers_s: float = 10.0  # a request's headers must arrive within this (then 408, close)
    timeout_body_s: float = 60.0  # and its body within this of them
    admission: str = "fcfs"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    stats_interval_s: float = 5.0
    warmup: bool = True


def default_model_name(model: str | None) -> str:
    """The name clients use when --served-model-name is not given: the directory name of a
    pullable model (SmolLM2-135M-Instruct), else --model as given (vLLM's convention)."""
    from kunlite.engine.pull import DEFAULT_MODEL, find_spec

    spec = find_spec(model or DEFAULT_MODEL)
    return spec.dir_name if spec is not None else str(model)


class Runtime:
    def __init__(self, cfg: ServeConfig, on_fatal: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.on_fatal = on_fatal
        self.model_names = cfg.served_model_names or (default_model_name(cfg.engine.model),)
        self.metrics = ServerMetrics(self.model_names[0])
        self.status = "loading"  # loading | ready | dead | failed
        self.status_detail = "the model is loading"
        self.tokenizer: Tokenizer | None = None
        self.engine: EngineClient | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.max_prompt_chars = 0  # texts longer than this are refused without tokenizing
        self.created = int(time.time())
        self.ledger = Ledger()
        self.policy: AdmissionPolicy | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # request id -> monotonic time of its latest output, per choice (for the ITL metric)
        self._last_output: dict[str, list[float]] = {}
        # The engine's latest message: when it came, and whether the engine was idle then.
        self._engine_said_at = 0.0
        self._engine_idle = True
        self._cost_models: dict[int, StepCostModel] = {}  # per instance but the first (policy.model)
        self.events: deque[ClusterEvent] = deque(maxlen=EVENTS_KEPT)  # the monitor's timeline
        self.recent = RecentServing()  # TTFT, TPOT and tokens of the last minute
        self._first_token_at: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._load(), name="kunlite-load"))
        self._tasks.append(asyncio.create_task(self._log_stats(), name="kunlite-stats-log"))

    async def _load(self) -> None:
        try:
            config = await asyncio.to_thread(self.cfg.engine.build)  # resolves (pulls) the model
            self.tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, config.model_dir)
            self.max_model_len = config.max_model_len
            # Token ids from clients must be valid for the tokenizer and for the embedding.
            self.vocab_size = min(self.tokenizer.vocab_size, config.model.vocab_size)
            # No token spells more characters than its longest vocabulary entry (byte-level
            # entries count bytes, more than characters): a longer text cannot fit the context.
            longest = max(map(len, self.tokenizer.convert_ids_to_tokens(range(self.tokenizer.vocab_size))))
            self.max_prompt_chars = self.max_model_len * max(longest, 1)
            sched = config.scheduler
            self.policy = AdmissionPolicy(AdmissionConfig(
                policy=self.cfg.admission,
                slo_ttft_s=self.cfg.slo_ttft_ms / 1e3 if self.cfg.slo_ttft_ms else None,
                slo_tpot_s=self.cfg.slo_tpot_ms / 1e3 if self.cfg.slo_tpot_ms else None,
                max_queued_requests=self.cfg.max_queued_requests, max_queued_tokens=self.cfg.max_queued_tokens,
                max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens))
            self.engine = EngineClient(replace(self.cfg.engine, model=str(Path(config.model_dir))),
                                       priority_order=self.cfg.admission == "priority", warmup=self.cfg.warmup,
                                       on_outputs=self.on_engine_outputs, on_dead=self._on_engine_dead)
            ready = await self.engine.start()
        except Exception as e:  # a bad --model, a failed pull, a worker that died loading
            self.status, self.status_detail = "failed", f"the model could not be loaded: {e}"
            log.error("%s", self.status_detail)
            if self.on_fatal is not None:
                self.on_fatal(self.status_detail)
            return
        if self.status == "loading":
            self.status, self.status_detail = "ready", "ok"
        log.info("engine ready: KV capacity %d tokens, max model len %d, %d layers, %s, %s attention "
                 "(worker pid %s); serving %s", ready.kv_capacity_tokens, ready.max_model_len, ready.num_layers,
                 ready.dtype, ready.attention_backend, self.engine.pid, ", ".join(self.model_names))

    def _on_engine_dead(self, why: str) -> None:
        if self.status in ("loading", "ready"):
            self.status, self.status_detail = "dead", f"engine unavailable: {why}"

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.stats_interval_s)
            if self.status == "ready":
                log.info("%s", self.metrics.log_line())

    # ------------------------------------------------------------------ accounting

    def step_start(self, instance: int | None = None) -> float | None:
        """When the current step of the engine (of `instance`, in a cluster) began, as far as
        the front end can tell (monotonic seconds), or None if it is idle. A busy engine begins
        a step right after each message; an idle one, when the first request after its last
        message reaches it. (In a cluster, instances step independently: an approximation.)"""
        reqs = [r for r in self.ledger.requests.values() if instance in (None, r.instance)]
        if not reqs:
            return None
        if not self._idle(instance):
            return self._engine_said_at
        later = [r.arrival for r in reqs if r.arrival >= self._engine_said_at]
        return min(later) if later else None

    def _idle(self, instance: int | None) -> bool:
        stats = self.metrics.stats
        if instance is None or stats is None or len(stats.instances) <= 1:
            return self._engine_idle
        inst = self.instance(instance)
        return inst is None or inst.running + inst.waiting == 0

    def instance(self, iid: int) -> InstanceStats | None:
        stats = self.metrics.stats
        return next((i for i in stats.instances if i.id == iid), None) if stats is not None else None

    def cost_model(self, instance: int | None) -> StepCostModel | None:
        """The step cost model of an instance (they differ: a pipeline's steps are not a
        replica's)."""
        if self.policy is None:
            return None
        if not instance:
            return self.policy.model
        return self._cost_models.setdefault(instance, StepCostModel())

    def dispatch(self) -> int | None:
        """The instance a new request goes to: the engine's dispatcher (Llumnix's freeness) on
        the front end's view: the latest device stats, and its own ledger for what is queued
        (which includes requests the engine has not reported yet). None when no instance serves."""
        stats = self.metrics.stats
        if stats is None or not stats.instances:
            return 0
        ps = stats.page_size
        loads = []
        for inst in stats.instances:
            pending = self.ledger.pending(inst.id)
            loads.append(InstanceLoad(inst.id, inst.state in ACCEPTING_STATES, inst.total_blocks, inst.used_blocks,
                                      sum(blocks_for(r.prompt_tokens, ps, r.n) for r in pending),
                                      len(self.ledger.running(inst.id)), len(pending)))
        return choose_instance(loads)

    def on_engine_outputs(self, msg: EngineOutputs) -> None:
        now = time.monotonic()
        m = self.metrics
        m.on_stats(msg.stats)
        self._engine_said_at = now
        self._engine_idle = msg.stats.num_running == 0 and msg.stats.num_waiting == 0
        for t in msg.timings:
            model = self.cost_model(t.instance)
            if model is not None:
                model.observe([t])
                log.debug("step %s predicted %.3f", t, model.step_seconds(
                    t.num_prefill_tokens, t.num_decode_tokens, t.num_context_tokens))
        self.events.extend(msg.events)
        for rid, iid in msg.moved:
            moved = self.ledger.requests.get(rid)
            if moved is not None:
                moved.instance = iid
        for _, seconds in msg.queue_times:
            m.queue_time.observe(seconds)
        for out in msg.outputs:
            req = self.ledger.requests.get(out.request_id)
            if req is None:
                continue  # warm-up, or a request already closed
            first = self.ledger.on_tokens(out.request_id, out.index, len(out.new_token_ids),
                                          out.finish_reason is not None)
            m.add_tokens(generation=len(out.new_token_ids))
            self.recent.add("tokens", now, len(out.new_token_ids))
            last = self._last_output.get(out.request_id)
            if first:
                m.ttft.observe(now - req.arrival)
                self.recent.add("ttft", now, now - req.arrival)
                self._first_token_at[out.request_id] = now
                self.calibrate(out.request_id, now - req.arrival)
                m.add_tokens(prompt=req.prompt_tokens)
                self._last_output[out.request_id] = [now] * req.n
            elif last is not None and 0 <= out.index < len(last) and out.new_token_ids:
                m.itl.observe(now - last[out.index])
                last[out.index] = now

    def calibrate(self, request_id: str, ttft: float) -> None:
        """Tell admission the TTFT (or, for a shed request, a lower bound of it) of a request it
        admitted with a prediction."""
        req = self.ledger.requests.get(request_id)
        if self.policy is None or req is None or req.predicted_ttft is None:
            return
        self.policy.calibration.observe(req.predicted_ttft, ttft)
        self.metrics.ttft_calibration.set(self.policy.calibration.factor)

    def forget(self, request_id: str) -> None:
        """The request is over for the front end (finished, aborted, or shed)."""
        req = self.ledger.remove(request_id)
        first = self._first_token_at.pop(request_id, None)
        if req is not None and first is not None and req.generated > 1 and req.live_seqs == 0:
            now = time.monotonic()
            tpot = (now - first) / (req.generated - 1)
            self.recent.add("tpot", now, tpot)
            self.metrics.tpot.observe(tpot)
        self._last_output.pop(request_id, None)
        if self.engine is not None:
            self.engine.release(request_id)
