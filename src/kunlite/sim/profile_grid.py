"""What `kunlite profile` measures, and how a step's batch is read back from its timing.

The grid has three kinds of cells:

    prefill (q, c)             one sequence: a chunk of q new tokens on c cached ones
    decode  (B, c)             B sequences decoding, each on about c tokens of context
    mixed   (B, c_d, q, c_p)   B decodes at c_d plus one prefill chunk (q, c_p) in one step

Contexts come from the prefix cache: the profiler first runs "documents" (random prompts) and
a cell's prompt is a document's first c tokens plus fresh tokens, so a cell costs its own
chunk only, and each decoding sequence reads a context of its own (no shared pages; only a
mixed step's chunk shares its prefix with one of the decodes).

`StepTiming` has aggregates only (prefill tokens P, decode tokens D, sum of the sequences'
tokens in KV after the step X). The batch is recovered exactly, because the profiler never
runs two prefilling sequences in one step:

    P == 0:         D decodes whose contexts sum to X - D (split evenly: the features
                    T, A, B only depend on that sum when every q is 1)
    P > 0, D == 0:  one chunk [(P, X - P)]
    P > 0, D > 0:   the D decodes' contexts as the profiler tracked them, and one chunk at
                    c_p = X - P - sum(c_i + 1)

Pure: plain numbers in and out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Batch = list[tuple[int, int]]  # (q, c) per sequence
Mixed = tuple[int, int, int, int]  # (B, c_decode, q, c_prefill)


@dataclass(frozen=True)
class Grid:
    prefill: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int], ...]
    mixed: tuple[Mixed, ...]
    repeats: int  # runs of every cell; a sample is the median of its repeats
    decode_steps: int  # decode steps timed per decode cell run

    @property
    def budget(self) -> int:
        """Tokens per step the engine must allow so that no cell's chunk is split."""
        need = [q for q, _ in self.prefill] + [b for b, _ in self.decode] + [b + q for b, _, q, _ in self.mixed]
        return max(need + [1])

    @property
    def max_seqs(self) -> int:
        return max([b for b, _ in self.decode] + [b + 1 for b, *_ in self.mixed] + [1])

    def fit_to(self, max_model_len: int) -> "Grid":
        """The cells whose sequences fit max_model_len tokens (decodes run decode_steps + 2
        tokens past their prompt, prompts are c + q)."""
        tail = self.decode_steps + 2
        return Grid(
            prefill=tuple((q, c) for q, c in self.prefill if c + q + 1 <= max_model_len),
            decode=tuple((b, c) for b, c in self.decode if c + 1 + tail <= max_model_len),
            mixed=tuple(m for m in self.mixed if max(m[1] + 1 + tail, m[3] + m[2] + 1) <= max_model_len),
            repeats=self.repeats, decode_steps=self.decode_steps)

    def doc_lengths(self) -> list[int]:
        """Length of each document (cached prefix) the cells use; index = document.

        Prefill cells and mixed prefills of repeat r use document r; decode cells and the
        decodes of mixed cells use documents 0..B-1, one per sequence.
        """
        need: dict[int, int] = {}

        def use(doc: int, length: int) -> None:
            need[doc] = max(need.get(doc, 0), length)

        for r in range(self.repeats):
            for _, c in self.prefill:
                use(r, c)
            for _, _, _, c_p in self.mixed:
                use(r, c_p)
        for b, c in self.decode:
            for i in range(b):
                use(i, c)
        for b, c_d, _, _ in self.mixed:
            for i in range(b):
                use(i, c_d)
        return [need.get(i, 0) for i in range(max(need, default=-1) + 1)]


FULL = Grid(
    prefill=tuple((q, c) for c in (0, 256, 1024) for q in (16, 32, 64, 128, 256, 512)),
    decode=tuple((b, c) for c in (64, 256, 1024) for b in (1, 2, 4, 8, 16, 32) if b * c <= 8192),
    mixed=((4, 256, 128, 0), (4, 256, 256, 512), (16, 64, 256, 0), (16, 256, 64, 1024), (8, 1024, 128, 256)),
    repeats=3, decode_steps=3)

QUICK = Grid(
    prefill=((16, 0), (128, 0), (128, 256), (512, 0)),
    decode=((1, 64), (4, 64), (1, 256), (4, 256)),
    mixed=((4, 64, 128, 0),),
    repeats=2, decode_steps=2)


def split_evenly(total: int, n: int) -> list[int]:
    """n non-negative integers that sum to total and differ by at most 1 (larger first)."""
    base, extra = divmod(total, n)
    return [base + 1] * extra + [base] * (n - extra)


def reconstruct(prefill: int, decode: int, context: int, decode_contexts: Sequence[int]) -> Batch | None:
    """The batch of a step from its StepTiming (P, D, X), or None when the aggregates do not
    fit one prefill chunk plus the tracked decodes. decode_contexts: the contexts before the
    step of the sequences that decode in it (needed only when P > 0 and D > 0)."""
    if decode > 0 and prefill == 0:
        rest = context - decode
        return [(1, c) for c in split_evenly(rest, decode)] if rest >= 0 else None
    if prefill > 0 and decode == 0:
        return [(prefill, context - prefill)] if context >= prefill else None
    if prefill > 0 and len(decode_contexts) == decode:
        c_p = context - prefill - sum(c + 1 for c in decode_contexts)
        return [(1, c) for c in decode_contexts] + [(prefill, c_p)] if c_p >= 0 else None
    return None


@dataclass(frozen=True)
class Sample:
    cell: str  # which grid cell produced it
    batch: Batch
    seconds: float  # median over repeats
    repeats: int

    def to_json(self) -> dict:
        return {"cell": self.cell, "batch": [list(x) for x in self.batch], "seconds": self.seconds,
                "repeats": self.repeats}


def median_samples(measured: Sequence[tuple[str, Batch, float]]) -> list[Sample]:
    """One sample per (cell, batch): the median of its measured seconds, in first-seen order."""
    groups: dict[tuple[str, tuple[tuple[int, int], ...]], list[float]] = {}
    for cell, batch, seconds in measured:
        groups.setdefault((cell, tuple(sorted(batch))), []).append(seconds)
    return [Sample(cell, list(batch), statistics.median(secs), len(secs)) for (cell, batch), secs in groups.items()]
