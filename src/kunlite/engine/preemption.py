"""Preemption policies: what happens to a running sequence when KV runs out.

The scheduler picks the victim (`select_victim`) and hands it to the policy. `recompute` (vLLM's
default) frees the victim's blocks and sends it back to the waiting queue; its tokens so far
(prompt and output) are prefilled again later, mostly from the prefix cache. Swap to host
(InferCept) and migration to another instance (Llumnix) are later policies behind the same hook.
"""

from __future__ import annotations

from typing import Protocol

from kunlite.engine.block_manager import BlockManager
from kunlite.engine.sequence import Sequence, SeqStatus


class PreemptionPolicy(Protocol):
    name: str

    def preempt(self, seq: Sequence, kv: BlockManager) -> None:
        """Take `seq` off the device; afterwards it holds no blocks and is WAITING."""


class RecomputePolicy:
    name = "recompute"

    def preempt(self, seq: Sequence, kv: BlockManager) -> None:
        kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING


POLICIES: dict[str, type[PreemptionPolicy]] = {"recompute": RecomputePolicy}


def select_victim(running: list[Sequence]) -> Sequence:
    """The running sequence that yields first: lowest priority (largest key), latest arrival."""
    return max(running, key=Sequence.priority_key)


def make_policy(name: str) -> PreemptionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown preemption mode {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()
