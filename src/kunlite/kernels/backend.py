"""The attention-backend interface: `prepare` once per step, `forward` once per layer.

The KV pool of a device is one tensor `kv_cache` of shape (P, 2, page_size, H_kv, d): page p
holds the keys (`[p, 0]`) and values (`[p, 1]`) of `page_size` consecutive tokens of one layer
of one sequence. Pages are per layer: a sequence's KV for local layer i lives in the pages
`page_tables[i, b, :]`, which can be anywhere in the pool, including pages that held
parameters a moment ago (the pool views parameters and KV pages over the same storage).

Batch layout (the runner guarantees it):
    sequences 0 .. num_decodes-1 have exactly one new token each (decode shape);
    sequences num_decodes .. B-1 have one or more (prefill chunk or extend over a cached prefix).
    The new tokens of sequence b are rows query_start_loc[b] : query_start_loc[b+1] of q/k/v, and
    they sit at positions seq_lens[b] - q_len[b] .. seq_lens[b] - 1 of the sequence.

`forward` first writes the new k and v into their slots, then attends causally: a query at
position t sees keys 0..t of its own sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class AttentionMetadata:
    """Per-step batch description; tensors live on the compute device."""

    num_decodes: int
    query_start_loc: torch.Tensor  # (B+1,) int32: cumulative new-token counts
    seq_lens: torch.Tensor  # (B,) int32: KV length after this step (cached + new)
    page_tables: torch.Tensor  # (L_local, B, max_pages) int32: page ids per local layer
    slot_mapping: torch.Tensor  # (L_local, T) int64: page * page_size + offset of each new token
    max_query_len: int
    max_seq_len: int
    # Host copies, so that backends never synchronise to learn a length.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Remote attention for some rows (a `transfer.remote_attention.RemoteCall`): called per layer
    # with (layer, q, k, v, o) after the local attention; returns o with those rows replaced.
    remote: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[1])

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


class AttentionBackend(ABC):
    """One attention implementation over the paged pool. Subclasses register by `name`."""

    name: ClassVar[str]

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.scale = scale

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Once per step, before the first layer: derive whatever the backend reuses per layer."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, H_q, d)
        k: torch.Tensor,  # (T, H_kv, d)
        v: torch.Tensor,  # (T, H_kv, d)
        kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
        layer: int,  # local layer index into meta.page_tables / meta.slot_mapping
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H_q, d)
        """Write k, v into the pool, then return causal attention of q over the sequence's KV."""


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str) -> type[AttentionBackend]:
    # Importing the modules registers their backends.
    if name == "torch":
        import kunlite.kernels.torch_backend  # noqa: F401
    elif name == "triton":
        import kunlite.kernels.triton_backend  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose from torch, triton")
    return _REGISTRY[name]
