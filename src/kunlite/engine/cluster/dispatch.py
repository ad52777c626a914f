"""Which instance takes a new request: a pure policy over plain numbers (Llumnix's freeness).

    freeness = (total blocks - used blocks - blocks the waiting requests need) / (running + waiting + 1)

the KV an instance could still give each of its requests if all of them grew at once. The
request goes to the serving instance with the most freeness: the one with the least memory
demand (KV in use plus the KV of the requests queued at its head) per request it serves. Ties
go to the lowest id. The `+ 1` counts the new request itself, so an idle instance's freeness
is its free KV and a loaded one's shrinks with its load.

The front end calls this with its own view (the latest device stats plus the requests it has
sent since), and the coordinator with its exact one; both use this function, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    id: int
    serving: bool
    total_blocks: int
    used_blocks: int
    waiting_blocks: int  # blocks the waiting requests need for their prompts
    running: int
    waiting: int


def freeness(load: InstanceLoad) -> float:
    return (load.total_blocks - load.used_blocks - load.waiting_blocks) / (load.running + load.waiting + 1)


def choose_instance(loads: Sequence[InstanceLoad]) -> int | None:
    """The serving instance with the most freeness; None when none serves."""
    serving = [x for x in loads if x.serving]
    if not serving:
        return None
    return max(serving, key=lambda x: (freeness(x), -x.id)).id


def blocks_for(num_tokens: int, page_size: int, n: int = 1) -> int:
    """Blocks a prompt of num_tokens needs for each of its n choices (they share full blocks)."""
    full, partial = divmod(num_tokens, page_size)
    return full + n * int(partial > 0)
