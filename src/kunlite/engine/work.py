"""What a device is told to do for one step, and what it answers: the boundary between the
scheduling side (an `Instance`, plain accounting) and the device side (`StageRunner`, tensors).

An instance is a pipeline of one or more members, each running a contiguous layer range. For
every step (a *microbatch* when several are in flight) the instance sends each member a
`StageWork`: the same sequences and tokens for all, and that member's own page tables and page
copies. The first member embeds the tokens, the others take the previous member's hidden
states (announced here: T rows of hidden_size), the last samples. Every member answers with a
`StageDone`; the last one's carries the sampled tokens.

The device side keeps no per-sequence state: everything a step needs travels in its work, so a
request can move between instances (migration, a merge of replicas) without telling anyone.
Sampling inputs are small (params, a step index); token histories travel only for rows with
penalties. All types are msgspec Structs (msgpack on the wire, never pickled); page tables are
raw int32 bytes with their shape.
"""

from __future__ import annotations

import msgspec
import numpy as np

from kunlite.engine.messages import TokenLogprobs
from kunlite.sampling_params import SamplingParams


class WorkSeq(msgspec.Struct, frozen=True, array_like=True):
    """One sequence in a step: it computes `tokens` at positions num_computed.. (decodes first)."""

    seq_id: str
    num_computed: int  # tokens whose KV is already in the pool
    tokens: list[int]  # the token ids this step computes (only the first member embeds them)


class SampleRow(msgspec.Struct, frozen=True, array_like=True):
    """One token to sample: from the logits of the last token of `WorkSeq` number `seq`.
    Several rows may share a sequence (the extra choices of n > 1 forked in this step)."""

    seq: int
    params: SamplingParams
    step_index: int  # tokens this choice has generated so far (seeded noise, min_tokens)
    prompt_ids: list[int] = []  # only for rows with penalties
    output_ids: list[int] = []


class PageMoves(msgspec.Struct, frozen=True, array_like=True):
    """Page-to-page copies inside one pool, done before the step's forward pass."""

    src: list[int] = []
    dst: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.src)


class HostMoves(msgspec.Struct, frozen=True, array_like=True):
    """Copies between pool pages and slots of the device's host swap space."""

    pages: list[int] = []
    slots: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.pages)


class RemoteRows(msgspec.Struct, frozen=True, array_like=True):
    """Sequences of a step whose KV for this stage's layers lives on `holder`: their attention
    runs there (remote attention); here they attend over a scratch page, and that output is
    replaced by the holder's."""

    holder: int
    rows: list[int]  # indices into StageWork.seqs


class StageWork(msgspec.Struct, frozen=True, tag=True):
    """One member's share of one step. Done in this order: swap out, swap in, copies, forward."""

    step_id: int
    instance: int
    stage: int  # position of this member in the pipeline
    num_stages: int
    prev_rank: int  # the member that sends this one its hidden states; -1 for the first
    next_rank: int  # the member this one sends its hidden states to; -1 for the last
    seqs: list[WorkSeq]
    num_decodes: int  # seqs[:num_decodes] have exactly one token each
    page_table: bytes  # int32 (L_local, B, max_blocks): the KV pages of each local layer
    table_shape: tuple[int, int, int]
    samples: list[SampleRow] = []  # the last member only
    copies: PageMoves = PageMoves()
    swap_out: HostMoves = HostMoves()
    swap_in: HostMoves = HostMoves()
    remote: list[RemoteRows] = []

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def pages(self) -> np.ndarray:  # (L_local, B, max_blocks) int32
        return np.frombuffer(self.page_table, dtype=np.int32).reshape(self.table_shape)


class StageDone(msgspec.Struct, frozen=True, tag=True):
    """A member finished its share of a step. The last member's carries one token per sample
    row (and the logprobs of the rows that asked); `seconds` is the member's compute time."""

    step_id: int
    instance: int
    rank: int
    seconds: float
    tokens: list[int] = []
    logprobs: list[TokenLogprobs | None] | None = None


class RemoteServe(msgspec.Struct, frozen=True, tag=True):
    """To a holder: run attention for `requester`'s step `step_id` over these sequences' KV of
    `layers` (the requester's layers), one layer after the other as q, k and v arrive."""

    step_id: int
    requester: int
    layers: tuple[int, int]
    seqs: list[WorkSeq]
    num_decodes: int
    page_table: bytes  # int32 (L, R, max_blocks) pages on the holder
    table_shape: tuple[int, int, int]

    def pages(self) -> np.ndarray:  # (L, R, max_blocks) int32
        return np.frombuffer(self.page_table, dtype=np.int32).reshape(self.table_shape)


def pack_pages(table: np.ndarray) -> tuple[bytes, tuple[int, int, int]]:
    """(L, B, max_blocks) page ids -> the bytes and shape StageWork carries."""
    arr = np.ascontiguousarray(table, dtype=np.int32)  # (L, B, max_blocks)
    return arr.tobytes(), (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
