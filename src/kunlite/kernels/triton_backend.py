"""The Triton attention backend: KV write, split-KV decode and varlen extend over the paged pool.

`prepare` (once per step) reads only host-side lengths and picks the launch parameters; `forward`
(once per layer) writes the new k, v and runs one decode launch over the decodes at the head of
the batch and one extend launch over the rest, into one output tensor.

q, k and v may be strided views (rows and heads), e.g. slices of a fused qkv projection:
    q = qkv[:, :q_size].view(T, H_q, d); only the last dim must be contiguous.

On CUDA the kernels are compiled. On CPU tensors they run under the Triton interpreter, which
needs TRITON_INTERPRET=1 in the environment before `kunlite.kernels.triton_backend` (or any
`kunlite.kernels.triton_*` module) is first imported; that path is for tests only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kunlite.kernels.backend import AttentionBackend, AttentionMetadata, register_backend
from kunlite.kernels.triton_decode import choose_num_kv_splits, decode_attention
from kunlite.kernels.triton_extend import extend_attention
from kunlite.kernels.triton_ops import write_kv


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class _StepPlan:
    meta: AttentionMetadata  # the step this plan belongs to (compared by identity)
    num_decodes: int
    num_kv_splits: int  # for the decode launch
    max_extend_query_len: int  # 0 when the step has only decodes


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"
    _plan: _StepPlan | None = None  # set by prepare(); forward() plans for itself on a new meta

    def _make_plan(self, meta: AttentionMetadata) -> _StepPlan:
        nd = meta.num_decodes
        splits = 1
        if nd:
            splits = choose_num_kv_splits(
                num_seqs=nd, num_kv_heads=self.num_kv_heads, max_seq_len=max(meta.seq_lens_cpu[:nd]),
                num_sms=_num_sms(meta.seq_lens.device),
            )
        return _StepPlan(meta=meta, num_decodes=nd, num_kv_splits=splits,
                         max_extend_query_len=max(meta.query_lens_cpu[nd:], default=0))

    def prepare(self, meta: AttentionMetadata) -> None:
        self._plan = self._make_plan(meta)

    def forward(
        self,
        q: torch.Tensor,  # (T, H_q, d)
        k: torch.Tensor,  # (T, H_kv, d)
        v: torch.Tensor,  # (T, H_kv, d)
        kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
        layer: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H_q, d)
        plan = self._plan if self._plan is not None and self._plan.meta is meta else self._make_plan(meta)
        write_kv(kv_cache, k, v, meta.slot_mapping[layer])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, H_q, d)
        page_table = meta.page_tables[layer]  # (B, max_pages)
        nd = plan.num_decodes
        if nd:
            decode_attention(q[:nd], kv_cache, page_table[:nd], meta.seq_lens[:nd], scale=self.scale,
                             num_kv_splits=plan.num_kv_splits, out=out[:nd])
        if plan.max_extend_query_len:
            # query_start_loc[nd:] holds absolute rows of q, so q and out go in whole.
            extend_attention(q, kv_cache, page_table[nd:], meta.query_start_loc[nd:], meta.seq_lens[nd:],
                             scale=self.scale, max_query_len=plan.max_extend_query_len, out=out)
        return out
