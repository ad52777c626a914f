"""What the cluster reports: `EngineStats` with one `InstanceStats` per instance (its devices,
layer ranges, parameter and KV bytes, exchange progress, bubble fraction), and the counters of
the policies. Read-only over the coordinator's state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kunlite.engine.instance import Instance
from kunlite.engine.messages import DeviceStats, EngineStats, InstanceStats

if TYPE_CHECKING:
    from kunlite.engine.cluster.coordinator import Cluster


def cluster_stats(c: Cluster) -> EngineStats:
    """The cluster's counters and every instance's, with the retired instances' counters kept."""
    insts = [instance_stats(c, i) for i in c.instances.values()]
    return EngineStats(
        num_running=sum(s.running for s in insts), num_waiting=sum(s.waiting for s in insts),
        kv_pages_used=sum(d.kv_used_bytes for s in insts for d in s.devices) // max(c._page_bytes(), 1),
        kv_pages_total=sum(d.kv_total_bytes for s in insts for d in s.devices) // max(c._page_bytes(), 1),
        num_preemptions_total=sum(i.scheduler.num_preemptions for i in c.instances.values())
        + int(c.retired.get("num_preemptions_total", 0)),
        param_pages=sum(w.ready.param_pages for w in c.workers.values() if w.ready),
        page_size=c.config.cache.page_size, instances=insts,
        num_worker_deaths_total=int(c.counters["num_worker_deaths_total"]), **_swap_counters(c),
        **_migration_counters(c), **_elastic_counters(c))

def _elastic_counters(c: Cluster) -> dict[str, Any]:
    e = c.elastic
    if e is None:
        return {}
    return {"num_drops_total": e.counters["drops"], "num_restores_total": e.counters["restores"],
            "exchanged_bytes_total": e.counters["exchanged_bytes"],
            "remote_attention_calls_total": e.counters["remote_attention_calls"],
            "state_seconds_total": e.state_seconds()}

def _migration_counters(c: Cluster) -> dict[str, Any]:
    m = c.migrator
    if m is None:
        return {}
    return {"num_migrations_total": m.num_done, "migration_bytes_total": m.bytes_moved,
            "migration_pause_seconds_total": m.pause_seconds, "num_migrations_aborted_total": m.num_aborted}

def _swap_counters(c: Cluster) -> dict[str, int]:
    total: dict[str, int] = {k: int(v) for k, v in c.retired.items() if k != "num_preemptions_total"}
    for inst in c.instances.values():
        for k, v in inst.swap_counters(c._page_bytes()).items():
            total[k] = total.get(k, 0) + v
    return total

def instance_stats(c: Cluster, inst: Instance) -> InstanceStats:
    pb = c._page_bytes()
    devices = []
    for m in inst.members:
        w = c.workers[m.rank]
        devices.append(DeviceStats(m.rank, w.pid, w.host, w.ready.device if w.ready else c.options.device,
                                   m.layers, w.state == "ready", w.ready.param_bytes if w.ready else 0,
                                   m.kv.num_used_pages * pb, m.kv.num_kv_pages * pb))
    load = next(x for x in c.loads() if x.id == inst.id)
    left, moved = c.elastic.progress(inst) if c.elastic is not None else (0, 0)
    return InstanceStats(inst.id, c.states[inst.id], load.running, load.waiting, load.used_blocks,
                         load.total_blocks, load.waiting_blocks, c.config.cache.page_size, devices, left, moved,
                         inst.bubbles.fraction(c.clock.now()) if len(inst.members) > 1 else 0.0)
