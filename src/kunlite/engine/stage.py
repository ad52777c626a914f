"""The device side of a step: one member's share of a `StageWork`, on its pool.

Order inside a step (the instance relies on it): swap-outs read their pages into the host swap
space, swap-ins write theirs, page copies run, then the forward pass. A page freed by a
swap-out in this very step may be the destination of a swap-in or of the step's new KV, so it
is read first.

The first stage embeds token ids; every other stage takes the previous stage's hidden states
(the caller receives them: moving bytes between devices is `transfer/`'s job). The last stage
turns the sampled rows into logits and samples; its StageDone carries the tokens.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kunlite.engine.runner import ModelRunner
from kunlite.engine.sampler import Sampler, SamplingBatch
from kunlite.engine.work import HostMoves, StageDone, StageWork


class HostSwapSpace:
    """A bounded host buffer of page-sized slots (pinned on CUDA) for swapped-out KV. The slots
    are handed out by the instance; this only moves bytes."""

    def __init__(self, num_slots: int, pool_kv: torch.Tensor) -> None:
        page_shape = tuple(pool_kv.shape[1:])  # (2, ps, H_kv, d)
        pin = pool_kv.device.type == "cuda"
        self.slots = torch.empty((num_slots, *page_shape), dtype=pool_kv.dtype, pin_memory=pin)  # (S, 2, ps, H_kv, d)

    def save(self, pool_kv: torch.Tensor, moves: HostMoves) -> None:
        pages = torch.tensor(moves.pages, dtype=torch.long, device=pool_kv.device)
        self.slots[torch.tensor(moves.slots, dtype=torch.long)] = pool_kv[pages].to("cpu")

    def load(self, pool_kv: torch.Tensor, moves: HostMoves) -> None:
        pages = torch.tensor(moves.pages, dtype=torch.long, device=pool_kv.device)
        pool_kv[pages] = self.slots[torch.tensor(moves.slots, dtype=torch.long)].to(pool_kv.device)


class StageRunner:
    def __init__(self, runner: ModelRunner, sampler: Sampler, eos: frozenset[int], rank: int = 0,
                 swap_slots: int = 0, remote: Any = None) -> None:
        self.runner = runner
        self.remote = remote  # builds the step's RemoteCall (transfer/remote_attention.py) for remote rows
        self.sampler = sampler
        self.eos = sorted(eos)
        self.rank = rank
        self.swap = HostSwapSpace(swap_slots, runner.pool.kv_cache) if swap_slots else None

    @torch.inference_mode()
    def run(self, work: StageWork, hidden: torch.Tensor | None = None) -> tuple[StageDone, torch.Tensor | None]:
        """Run the step. Returns the StageDone and, on every stage but the last, the (T, h)
        hidden states for the next stage."""
        start = time.perf_counter()
        kv = self.runner.pool.kv_cache  # (P, 2, ps, H_kv, d)
        if work.swap_out or work.swap_in:
            if self.swap is None:
                raise RuntimeError("a swap was planned on a device without swap space")
            if work.swap_out:
                self.swap.save(kv, work.swap_out)
            if work.swap_in:
                self.swap.load(kv, work.swap_in)
        if work.copies:
            self.runner.copy_pages(np.asarray(work.copies.src), np.asarray(work.copies.dst))
        inputs = self.runner.prepare(work)
        if work.remote:
            if self.remote is None:
                raise RuntimeError("a step with remote attention on a device that cannot call one")
            inputs.meta.remote = self.remote(work, inputs.meta.query_lens_cpu)
        out = self.runner.forward(inputs, hidden)  # (T, h), or (R, V) logits on the last stage
        if not work.is_last:
            return StageDone(work.step_id, work.instance, self.rank, time.perf_counter() - start), out
        tokens, logprobs = self._sample(out, work)
        return StageDone(work.step_id, work.instance, self.rank, time.perf_counter() - start, tokens, logprobs), None

    def _sample(self, logits: torch.Tensor, work: StageWork):  # type: ignore[no-untyped-def]
        """logits: (R, V), one row per sampled sequence in ascending sequence order."""
        rows = work.samples
        if not rows:
            return [], None
        order = {seq: i for i, seq in enumerate(sorted({r.seq for r in rows}))}
        index = [order[r.seq] for r in rows]
        if index != list(range(len(index))):
            logits = logits[torch.tensor(index, device=logits.device)]  # (R', V)
        batch = SamplingBatch.from_params([r.params for r in rows], [r.prompt_ids for r in rows],
                                          [r.output_ids for r in rows], [r.step_index for r in rows],
                                          self.eos, logits.shape[1], logits.device)
        out = self.sampler(logits, batch)
        return out.token_ids.tolist(), out.logprobs
