"""`GET /v1/cluster`: the monitor's view of every instance and device, as JSON.

    {"object": "cluster", "time": <unix seconds>, "overload_policy": "recompute",
     "instances": [{"id", "state", "running", "waiting", "kv_used_blocks", "kv_total_blocks",
                    "waiting_blocks", "demand_blocks", "page_size", "exchange_left", "exchanged_bytes",
                    "devices": [{"rank", "pid", "host", "device", "layers": [l0, l1], "alive",
                                 "param_bytes", "kv_used_bytes", "kv_total_bytes", "kv_free_bytes"}]}],
     "counters": {"preemptions", "swaps_out", "swaps_in", "swap_out_bytes", "swap_in_bytes",
                  "migrations", "migration_bytes", "migration_pause_seconds",
                  "migrations_aborted", "worker_deaths", "drops", "restores", "exchanged_bytes",
                  "remote_attention_calls"},
     "state_seconds": {state: instance-seconds spent in it},
     "events": [{"time", "kind", "instance", "detail"}],   (the latest, oldest first)
     "serving": {"window_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                 "output_tokens_per_s", "requests_finished", "running", "waiting"}}
Percentiles are over the requests of the last `window_s` seconds (null with none).

A state is "serving", "exchanging" / "pipeline" / "restoring" (a group merged by the
parameter-centric policy: moving its requests' KV / running as a pipeline / splitting back),
"degraded" (a member died; its requests failed) or "restarting" (the member is loading again,
or communication is being re-formed). `demand_blocks` is what the
dispatcher weighs: the KV in use plus the KV the waiting requests need.
"""

from __future__ import annotations

import time
from typing import Any

from kunlite.server.runtime import Runtime

EVENTS_WINDOW_S = 600.0  # events older than this are not shown


def cluster_view(rt: Runtime) -> dict[str, Any]:
    stats = rt.metrics.stats
    instances = []
    for inst in stats.instances if stats else []:
        devices = [{"rank": d.rank, "pid": d.pid, "host": d.host, "device": d.device, "layers": list(d.layers),
                    "alive": d.alive, "param_bytes": d.param_bytes, "kv_used_bytes": d.kv_used_bytes,
                    "kv_total_bytes": d.kv_total_bytes, "kv_free_bytes": d.kv_total_bytes - d.kv_used_bytes}
                   for d in inst.devices]
        instances.append({"id": inst.id, "state": inst.state, "running": inst.running, "waiting": inst.waiting,
                          "kv_used_blocks": inst.used_blocks, "kv_total_blocks": inst.total_blocks,
                          "waiting_blocks": inst.waiting_blocks, "demand_blocks": inst.used_blocks + inst.waiting_blocks,
                          "page_size": inst.page_size, "exchange_left": inst.exchange_left,
                          "exchanged_bytes": inst.exchanged_bytes, "devices": devices})
    counters: dict[str, float] = {}
    if stats is not None:
        counters = {"preemptions": stats.num_preemptions_total, "swaps_out": stats.num_swaps_out_total,
                    "swaps_in": stats.num_swaps_in_total, "swap_out_bytes": stats.swap_out_bytes_total,
                    "swap_in_bytes": stats.swap_in_bytes_total, "migrations": stats.num_migrations_total,
                    "migration_bytes": stats.migration_bytes_total,
                    "migration_pause_seconds": stats.migration_pause_seconds_total,
                    "migrations_aborted": stats.num_migrations_aborted_total,
                    "worker_deaths": stats.num_worker_deaths_total, "drops": stats.num_drops_total,
                    "restores": stats.num_restores_total, "exchanged_bytes": stats.exchanged_bytes_total,
                    "remote_attention_calls": stats.remote_attention_calls_total}
    since = time.time() - EVENTS_WINDOW_S
    events = [{"time": e.time, "kind": e.kind, "instance": e.instance, "detail": e.detail}
              for e in rt.events if e.time >= since]
    serving = rt.recent.summary(time.monotonic())
    serving.update(running=stats.num_running if stats else 0, waiting=stats.num_waiting if stats else 0)
    return {"object": "cluster", "time": time.time(), "overload_policy": rt.cfg.engine.overload_policy,
            "instances": instances, "counters": counters, "events": events, "serving": serving,
            "state_seconds": dict(stats.state_seconds_total) if stats else {}}
