"""When to drop parameters and how: the trigger and the planner of the parameter-centric policy
(KunServe), pure functions of plain numbers.

Trigger (per instance):
    throttled  KV use >= `high_usage` (95%) and the KV its waiting requests need is at least
               what is free: the queue cannot drain without more memory
    calm       KV use is under `calm_fraction` (half) of the capacity it would have undropped,
               nothing waits, and use has not risen for `calm_window_s`
Plan (for the cluster): the groups (instances) sit in a min-heap by size; the two smallest
merge into one pipeline group, whose members each keep a contiguous, balanced share of the
layers; the parameter bytes that stop being duplicates count as freed; repeat until the freed
bytes cover the deficit. Merging the smallest first keeps groups balanced, so the plan has the
fewest pipeline stages (each stage costs latency) that free enough. O(N log N).
A restore splits a merged group back into the groups it was made of: the inverse of its merge.

Parameter bytes come per group of the pool ("embed", "layer.i", "head"): a member of a k-stage
group keeps the layers of its share, the embedding if it is the first stage (or the last one
with tied embeddings), and the head if it is the last.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class TriggerConfig:
    high_usage: float = 0.95  # throttled at or above this KV use
    calm_fraction: float = 0.5  # calm below this share of the undropped capacity
    calm_window_s: float = 5.0  # ... with use not rising for this long

    def __post_init__(self) -> None:
        if not (0 < self.high_usage <= 1 and 0 < self.calm_fraction <= 1 and self.calm_window_s >= 0):
            raise ValueError("--drop-usage and --calm-fraction must be in (0, 1], --calm-window >= 0")


@dataclass(frozen=True)
class KVLoad:
    """An instance's KV in tokens (blocks differ between layouts; tokens do not)."""

    used: int
    total: int
    waiting_need: int  # tokens the waiting requests' prompts need
    waiting: int  # waiting requests

    @property
    def free(self) -> int:
        return self.total - self.used


def throttled(load: KVLoad, cfg: TriggerConfig) -> bool:
    return (load.waiting > 0 and load.total > 0 and load.used >= cfg.high_usage * load.total
            and load.waiting_need >= load.free)


@dataclass
class CalmWatch:
    """Whether a merged group is calm: its use (tokens) recorded over time, against the capacity
    it would have split back into replicas."""

    cfg: TriggerConfig
    history: deque[tuple[float, int]] = field(default_factory=deque)
    rises: int = 0  # consecutive pairs of `history` whose use went up: falling iff none

    def observe(self, now: float, load: KVLoad, undropped_total: int) -> bool:
        if self.history and load.used > self.history[-1][1]:
            self.rises += 1
        self.history.append((now, load.used))
        while len(self.history) > 1 and self.history[1][0] <= now - self.cfg.calm_window_s:
            first = self.history.popleft()  # keep one sample at or before the window's start
            if self.history[0][1] > first[1]:
                self.rises -= 1
        spans_window = self.history[0][0] <= now - self.cfg.calm_window_s
        falling = self.rises == 0
        return (load.waiting == 0 and load.used < self.cfg.calm_fraction * undropped_total
                and spans_window and falling)


# ---------------------------------------------------------------- the planner


@dataclass(frozen=True)
class ModelBytes:
    """Parameter bytes per pool group, the same on every device."""

    layers: tuple[int, ...]  # bytes of layer i's group
    embed: int
    head: int
    tied: bool  # the LM head is the embedding: the last stage keeps "embed" too

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def replica_bytes(self) -> int:
        return sum(self.layers) + self.embed + self.head

    def member_bytes(self, layers: tuple[int, int]) -> int:
        """Bytes a member running `layers` keeps."""
        lo, hi = layers
        first, last = lo == 0, hi == self.num_layers
        embed = self.embed if first or (last and self.tied) else 0
        return sum(self.layers[lo:hi]) + embed + (self.head if last else 0)


def balanced_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges whose sizes differ by at most one (the first stages take the
    extra layers: the last one also holds the LM head)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for i in range(stages):
        n = base + (i < extra)
        out.append((start, start + n))
        start += n
    return out


def group_bytes(model: ModelBytes, size: int) -> int:
    """Parameter bytes a group of `size` members holds in all."""
    return sum(model.member_bytes(r) for r in balanced_ranges(model.num_layers, size))


@dataclass(frozen=True)
class Group:
    """A group of devices (an instance): its ranks in pipeline order."""

    id: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Merge:
    """One new group and the groups it was made of (in pipeline order)."""

    ranks: tuple[int, ...]
    parts: tuple[Group, ...]
    layers: tuple[tuple[int, int], ...]  # per member, in the order of ranks


@dataclass(frozen=True)
class MergePlan:
    merges: tuple[Merge, ...]  # only the groups that change
    freed_bytes: int
    covers: bool  # freed_bytes >= the deficit (else it merged everything it could)
    num_merges: int = 0  # pairwise merges it took


def plan_merge(groups: Sequence[Group], deficit_bytes: int, model: ModelBytes,
               max_merges: int | None = None) -> MergePlan:
    """Merge the two smallest groups until the freed bytes cover `deficit_bytes` (nothing when
    the deficit is not positive), or `max_merges` merges are done. A group can grow to one
    member per layer at most."""
    if deficit_bytes <= 0 or len(groups) < 2:
        return MergePlan((), 0, deficit_bytes <= 0)
    # (size, first id, ranks, the original groups it holds)
    heap = [(len(g.ranks), g.id, g.ranks, (g,)) for g in groups]
    heapq.heapify(heap)
    freed, done = 0, 0
    while freed < deficit_bytes and len(heap) >= 2 and (max_merges is None or done < max_merges):
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        size = a[0] + b[0]
        if size > model.num_layers:  # the smallest pair cannot merge, so no pair can
            heapq.heappush(heap, a)
            heapq.heappush(heap, b)
            break
        freed += group_bytes(model, a[0]) + group_bytes(model, b[0]) - group_bytes(model, size)
        heapq.heappush(heap, (size, min(a[1], b[1]), a[2] + b[2], a[3] + b[3]))
        done += 1
    merges = tuple(Merge(ranks, parts, tuple(balanced_ranges(model.num_layers, len(ranks))))
                   for _, _, ranks, parts in sorted(heap, key=lambda e: e[1]) if len(parts) > 1)
    return MergePlan(merges, freed, freed >= deficit_bytes, done)


def plan_split(merge: Merge) -> tuple[Group, ...]:
    """The restore plan of a merged group: the groups it was made of."""
    return merge.parts
