"""Prometheus metrics, named like vLLM's (`vllm:` -> `kunlite:`) so that existing dashboards
work, and the one-line periodic log.

Every metric carries the `model_name` label, as vLLM's do. Every counter is exposed from the
start, at 0 until its first event (the labelled ones for every finish reason and rejection
reason, as vLLM does for its finish reasons), so that dashboards (examples/grafana/) find
their series before the first event.
Each server has its own registry (several servers can live in one test process). Latencies
are measured in the front end, at the moment an engine output reaches it; the queue time is
measured in the engine (from the request's arrival there to its first scheduled step).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kunlite.engine.messages import EngineStats

FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("slo_ttft", "slo_tpot", "queue_requests", "queue_tokens", "deadline")  # admission's, the shedder's
ABORT_REASONS = ("client_disconnect", "header_timeout", "body_timeout")  # before a response began
INSTANCE_STATES = ("serving", "exchanging", "pipeline", "restoring", "degraded", "restarting")
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=r)

        self._ttft = hist("kunlite:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self._itl = hist("kunlite:inter_token_latency_seconds", "Time between two outputs of a sequence.",
                         _LATENCY_BUCKETS)
        self._tpot = hist("kunlite:request_time_per_output_token_seconds",
                          "Time per output token of a finished request: (end - first token) / (tokens - 1).",
                          _LATENCY_BUCKETS)
        self._e2e = hist("kunlite:e2e_request_latency_seconds", "End-to-end request latency.", _REQUEST_BUCKETS)
        self._queue = hist("kunlite:request_queue_time_seconds",
                           "Time a request waited in the engine queue.", _REQUEST_BUCKETS)
        self._running = Gauge("kunlite:num_requests_running", "Sequences running in the engine.", m, registry=r)
        self._waiting = Gauge("kunlite:num_requests_waiting", "Sequences waiting in the engine.", m, registry=r)
        self._kv = Gauge("kunlite:kv_cache_usage_perc", "KV cache usage (1 = full).", m, registry=r)
        self._calibration = Gauge("kunlite:ttft_calibration_factor",
                                  "Factor admission scales its TTFT predictions by (recent measured / predicted).",
                                  m, registry=r)
        self._preemptions = Counter("kunlite:num_preemptions", "Preemptions by the engine.", m, registry=r)
        self._prompt = Counter("kunlite:prompt_tokens", "Prompt tokens of started requests (prefix-cache hits too).",
                               m, registry=r)
        self._generation = Counter("kunlite:generation_tokens", "Tokens generated.", m, registry=r)
        self._success = Counter("kunlite:request_success", "Finished choices, by finish reason.",
                                m + ["finished_reason"], registry=r)
        self._rejected = Counter("kunlite:requests_rejected", "Requests turned away by admission, by reason.",
                                 m + ["reason"], registry=r)
        # The cluster: one series per device, labelled with its instance.
        d = m + ["instance", "device"]

        def device_gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kunlite:device_{name}", doc, d, registry=r)

        self._device = {
            "param_bytes": device_gauge("param_bytes", "Bytes of the device's pool that hold parameters."),
            "kv_used_bytes": device_gauge("kv_used_bytes", "Bytes of KV pages in use on the device."),
            "kv_free_bytes": device_gauge("kv_free_bytes", "Bytes of KV pages free on the device."),
            "kv_demand_bytes": device_gauge("kv_demand_bytes", "KV in use plus the KV the instance's waiting "
                                            "requests need, on this device (the dispatcher's measure)."),
            "num_requests_running": device_gauge("num_requests_running", "Requests running on the device's instance."),
            "num_requests_waiting": device_gauge("num_requests_waiting", "Requests waiting on the device's instance."),
            "up": device_gauge("up", "1 while the device's worker is alive."),
        }
        self._instance_state = Gauge("kunlite:instance_state", "1 for the instance's current state.",
                                     m + ["instance", "state"], registry=r)
        self._overload = {name: Counter(f"kunlite:{name}", doc, m, registry=r) for name, doc in (
            ("num_swaps_out", "Preempted requests whose KV went to host memory."),
            ("num_swaps_in", "Swapped-out requests whose KV came back."),
            ("swap_out_bytes", "Bytes of KV swapped out to host memory."),
            ("swap_in_bytes", "Bytes of KV swapped back in."),
            ("num_migrations", "Requests moved live to another instance."),
            ("migration_bytes", "Bytes of KV moved by migrations."),
            ("migration_pause_seconds", "Seconds migrating requests were paused for their last copy."),
            ("num_migrations_aborted", "Migrations abandoned (a side failed or the request ended)."),
            ("num_worker_deaths", "Device workers that died."),
            ("num_drops", "Parameter-centric drops: replicas merged into a pipeline, duplicate parameters made KV."),
            ("num_restores", "Merged groups split back into replicas (dropped parameters restored)."),
            ("exchanged_bytes", "Bytes of KV moved by the exchanges after drops."),
            ("remote_attention_calls", "Layers of steps whose attention ran on the device holding the KV."),
        )}
        self._state_seconds = Counter("kunlite:instance_state_seconds",
                                      "Instance-seconds spent in each state (serving, exchanging, pipeline, "
                                      "restoring, degraded, restarting).", m + ["state"], registry=r)
        self._state_seen: dict[str, float] = {}
        self._overload_seen: dict[str, float] = {}
        self._aborted = Counter("kunlite:requests_aborted",
                                "Requests that ended before their response began, by reason: the client went away "
                                "(client_disconnect), or sent its headers or body too slowly (header_timeout, "
                                "body_timeout).", m + ["reason"], registry=r)
        self.model_name = model_name
        self.ttft = self._ttft.labels(model_name)
        self.itl = self._itl.labels(model_name)
        self.tpot = self._tpot.labels(model_name)
        self.e2e = self._e2e.labels(model_name)
        self.queue_time = self._queue.labels(model_name)
        self.running = self._running.labels(model_name)
        self.waiting = self._waiting.labels(model_name)
        self.kv_usage = self._kv.labels(model_name)
        self.ttft_calibration = self._calibration.labels(model_name)
        self.ttft_calibration.set(1.0)
        self.preemptions = self._preemptions.labels(model_name)
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        for reason in REJECT_REASONS:
            self._rejected.labels(model_name, reason)
        for reason in ABORT_REASONS:
            self._aborted.labels(model_name, reason)
        for state in INSTANCE_STATES:
            self._state_seconds.labels(model_name, state)
        for counter in self._overload.values():
            counter.labels(model_name)
        self._prompt_tokens = self._prompt.labels(model_name)
        self._generation_tokens = self._generation.labels(model_name)
        self.prompt_total = 0  # the two token counters' values, for the log line
        self.generation_total = 0
        self._preemptions_seen = 0
        self.stats: EngineStats | None = None
        # for the periodic log line: (time, prompt tokens, generation tokens) at the last line
        self._last_log = (time.monotonic(), 0, 0)

    def add_tokens(self, prompt: int = 0, generation: int = 0) -> None:
        if prompt:
            self._prompt_tokens.inc(prompt)
            self.prompt_total += prompt
        if generation:
            self._generation_tokens.inc(generation)
            self.generation_total += generation

    def success(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def aborted(self, reason: str) -> None:
        self._aborted.labels(self.model_name, reason).inc()

    def on_stats(self, stats: EngineStats) -> None:
        self.stats = stats
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        if stats.num_preemptions_total > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions_total - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions_total
        for name, counter in self._overload.items():
            total = float(getattr(stats, f"{name}_total"))
            if total > self._overload_seen.get(name, 0.0):
                counter.labels(self.model_name).inc(total - self._overload_seen.get(name, 0.0))
                self._overload_seen[name] = total
        for state, seconds in stats.state_seconds_total.items():
            seen = self._state_seen.get(state, 0.0)
            if seconds > seen:
                self._state_seconds.labels(self.model_name, state).inc(seconds - seen)
                self._state_seen[state] = seconds
        self._set_devices(stats)

    def _set_devices(self, stats: EngineStats) -> None:
        """Per-device series; an instance that is gone (merged, re-formed) leaves no stale one."""
        for g in [*self._device.values(), self._instance_state]:
            g.clear()
        for inst in stats.instances:
            iid = str(inst.id)
            self._instance_state.labels(self.model_name, iid, inst.state).set(1)
            for dev in inst.devices:
                per_block = dev.kv_total_bytes / max(inst.total_blocks, 1)  # this device's bytes per block
                values = {"param_bytes": dev.param_bytes, "kv_used_bytes": dev.kv_used_bytes,
                          "kv_free_bytes": dev.kv_total_bytes - dev.kv_used_bytes,
                          "kv_demand_bytes": dev.kv_used_bytes + inst.waiting_blocks * per_block,
                          "num_requests_running": inst.running, "num_requests_waiting": inst.waiting,
                          "up": int(dev.alive)}
                for name, value in values.items():
                    self._device[name].labels(self.model_name, iid, str(dev.rank)).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def log_line(self) -> str:
        """Running, waiting, KV use and token throughput since the previous line."""
        now = time.monotonic()
        prompt, gen = self.prompt_total, self.generation_total
        t0, p0, g0 = self._last_log
        self._last_log = (now, prompt, gen)
        dt = max(now - t0, 1e-9)
        s = self.stats
        running, waiting, kv = (s.num_running, s.num_waiting, s.kv_usage * 100) if s else (0, 0, 0.0)
        line = (f"running: {running} reqs, waiting: {waiting} reqs, KV cache usage: {kv:.1f}%, "
                f"prompt throughput: {(prompt - p0) / dt:.1f} tokens/s, "
                f"generation throughput: {(gen - g0) / dt:.1f} tokens/s")
        if s is not None and len(s.instances) > 1:
            parts = []
            for inst in s.instances:
                ranks = ",".join(str(d.rank) for d in inst.devices)
                usage = 100 * inst.used_blocks / max(inst.total_blocks, 1)
                parts.append(f"instance {inst.id} [{inst.state}, devices {ranks}]: {inst.running} running, "
                             f"{inst.waiting} waiting, KV {usage:.1f}%")
            line += "; " + "; ".join(parts)
        return line
