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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kunlite.engine.args import EngineOptions
from kunlite.engine.messages import EngineOutputs
from kunlite.engine.tokenizer import Tokenizer
from kunlite.server.admission import AdmissionConfig, AdmissionPolicy, Ledger
from kunlite.server.engine_client import EngineClient
from kunlite.server.metrics import ServerMetrics

log = logging.getLogger("kunlite.server")


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

    def step_start(self) -> float | None:
        """When the engine's current step began, as far as the front end can tell (monotonic
        seconds), or None if it is idle. A busy worker begins a step right after each message;
        an idle one, when the first request after its last message reaches it."""
        if not self.ledger.requests:
            return None
        if not self._engine_idle:
            return self._engine_said_at
        later = [r.arrival for r in self.ledger.requests.values() if r.arrival >= self._engine_said_at]
        return min(later) if later else None

    def on_engine_outputs(self, msg: EngineOutputs) -> None:
        now = time.monotonic()
        m = self.metrics
        m.on_stats(msg.stats)
        self._engine_said_at = now
        self._engine_idle = msg.stats.num_running == 0 and msg.stats.num_waiting == 0
        if self.policy is not None and msg.timings:
            self.policy.model.observe(msg.timings)
            if log.isEnabledFor(logging.DEBUG):
                for t in msg.timings:
                    log.debug("step %s predicted %.3f", t, self.policy.model.step_seconds(
                        t.num_prefill_tokens, t.num_decode_tokens, t.num_context_tokens))
        for _, seconds in msg.queue_times:
            m.queue_time.observe(seconds)
        for out in msg.outputs:
            req = self.ledger.requests.get(out.request_id)
            if req is None:
                continue  # warm-up, or a request already closed
            first = self.ledger.on_tokens(out.request_id, out.index, len(out.new_token_ids),
                                          out.finish_reason is not None)
            m.add_tokens(generation=len(out.new_token_ids))
            last = self._last_output.get(out.request_id)
            if first:
                m.ttft.observe(now - req.arrival)
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
        self.ledger.remove(request_id)
        self._last_output.pop(request_id, None)
        if self.engine is not None:
            self.engine.release(request_id)
