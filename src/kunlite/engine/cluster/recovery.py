"""Bringing a cluster back after a worker died and was started again: once every worker is
loaded, the coordinator stops planning, lets the steps in flight finish, re-forms the world
(every worker joins the next generation of torch.distributed) and lets the instances that were
down serve again."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kunlite.engine.cluster.messages import Reform
from kunlite.engine.messages import ClusterEvent

if TYPE_CHECKING:
    from kunlite.engine.cluster.coordinator import Cluster

log = logging.getLogger("kunlite.cluster")
DOWN = ("degraded", "restarting")  # a member died: the instance waits for it to come back


def recover(c: Cluster) -> None:
    """Once every worker is loaded again: stop planning, let the steps in flight finish,
    re-form the world (every worker joins the next generation), and let the instances that
    were down serve again. The serving instances pause for about one step."""
    down = [i for i in c.instances.values() if c.states[i.id] in DOWN]
    if any(w.state != "ready" for w in c.workers.values()):
        c.quiescing, c._reforming = False, None
        for inst in down:
            if all(c.workers[m.rank].state in ("loading", "ready") for m in inst.members):
                c.states[inst.id] = "restarting"
        return
    if c._reforming is None:
        c.quiescing = True
        if c.migrator is not None:
            c.migrator.abort_all("the world is being re-formed")
            if not c.migrator.idle:
                return
        if any(i.flights for i in c.instances.values()):
            return
        c._reforming = c.generation + 1
        c._reform_deadline = time.monotonic() + c.options.join_timeout
        for w in c.workers.values():
            c.send(w.rank, Reform(c._reforming))
        return
    if any(w.generation != c._reforming for w in c.workers.values()):
        if time.monotonic() > c._reform_deadline:
            for w in c.workers.values():
                if w.generation != c._reforming:
                    c._death(w, f"it did not join generation {c._reforming} of the world", [])
        return
    c.generation, c._reforming, c.quiescing = c._reforming, None, False
    log.info("world generation %d formed by %d workers", c.generation, len(c.workers))
    for inst in down:
        c.retire(inst)
        replicas = c.elastic.recover(inst.id) if c.elastic is not None else None
        if replicas is None:
            replicas = [c._new_instance(inst.id, [m.rank for m in inst.members])]
        del c.instances[inst.id]
        del c.states[inst.id]
        for fresh in replicas:
            c.instances[fresh.id] = fresh
            c.states[fresh.id] = "serving"
            c.events.append(ClusterEvent(time.time(), "instance_restored", fresh.id))
            log.info("instance %d serves again", fresh.id)
