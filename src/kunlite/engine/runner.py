"""Model runner: turns a scheduled batch into tensors, runs the layer range, returns logits.

It owns the device side of one worker: the pool, the model bound to it, the attention backend
and the weight loader. It never decides anything; the scheduler and block manager do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kunlite.config import EngineConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.cpu_tuning import advise_huge_pages
from kunlite.engine.memory import DevicePool, page_elems
from kunlite.engine.model import CausalLM, Rope, param_groups
from kunlite.engine.work import StageWork, WorkSeq
from kunlite.engine.weights import WeightLoader
from kunlite.kernels.backend import AttentionMetadata, get_backend

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    inputs: torch.Tensor  # (T,) token ids (used by the first stage only)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (R,) rows of the hidden states to turn into logits


def default_device_memory(config: EngineConfig, param_bytes: int) -> int:
    """Pool bytes when --device-memory is not given: on CUDA, 90% of free memory less a
    workspace (vLLM's gpu_memory_utilization); on CPU, the parameters plus 2 GiB of KV."""
    if config.device.is_cuda:
        free, _ = torch.cuda.mem_get_info(config.device.torch_device)
        return int(free * 0.9) - (1 << 30)
    return param_bytes + (2 << 30)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        cfg, dev = config.model, config.device
        self.device, self.dtype = dev.torch_device, dev.torch_dtype
        self.layers = config.layers
        self.num_local_layers = self.layers[1] - self.layers[0]
        self.page_size = config.cache.page_size
        groups = param_groups(cfg, self.layers)
        elem = torch.empty(0, dtype=self.dtype).element_size()
        param_bytes = sum(int(np.prod(s)) for g in groups.values() for _, s in g) * elem
        budget = config.cache.device_memory or default_device_memory(config, param_bytes)
        page_bytes = page_elems(self.page_size, cfg.num_kv_heads, cfg.head_dim) * elem
        self.loader = WeightLoader(config.model_dir, cfg)
        # Zeroed, so that every page holds finite numbers: the torch backend reads whole pages
        # and masks the tail, and 0 * NaN would leak through.
        self.pool = DevicePool(num_pages=budget // page_bytes, page_size=self.page_size,
                               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                               dtype=self.dtype, device=self.device, groups=groups)
        advise_huge_pages(self.pool.storage)
        self.pool.storage.zero_()
        self.loader.load(self.pool)
        backend_cls = get_backend(dev.backend_name)
        self.backend = backend_cls(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, page_size=self.page_size,
                                   scale=cfg.head_dim ** -0.5)
        self.rope = Rope(cfg, config.max_model_len, self.device, self.dtype)
        self.model = CausalLM(cfg, self.layers, self.backend, self.pool, self.rope)

    def new_block_manager(self) -> BlockManager:
        return BlockManager(page_size=self.page_size, layers=self.layers, num_layers=self.config.model.num_layers,
                            pages=self.pool.initial_kv_pages(),
                            enable_prefix_caching=self.config.cache.enable_prefix_caching)

    # ------------------------------------------------------------------ one step

    def prepare(self, work: StageWork) -> StepInputs:
        """Flatten the step's sequences (decodes first, as scheduled) into model inputs and
        attention metadata over this device's pages. Rows whose attention runs remotely attend
        here over their own new tokens only (on a scratch page): their output is replaced."""
        lo, hi = self.model.active
        page_tables = work.pages()  # (L, B, max_blocks)
        if page_tables.shape[0] != hi - lo:
            raise ValueError(f"the step's page table covers {page_tables.shape[0]} layers; this device runs "
                             f"{hi - lo}")
        remote = {r for rr in work.remote for r in rr.rows}
        meta, pos = self.metadata(work.seqs, page_tables, work.num_decodes, remote)
        qsl = meta.query_lens_cpu
        ends = np.cumsum(qsl) - 1  # (B,) the last token of each sequence
        rows = sorted({r.seq for r in work.samples})
        dev = self.device
        tokens = [t for s in work.seqs for t in s.tokens] if work.is_first else []
        return StepInputs(
            inputs=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=torch.from_numpy(pos).to(dev), meta=meta,
            logits_indices=torch.tensor([int(ends[r]) for r in rows], dtype=torch.long, device=dev))

    def metadata(self, seqs: list[WorkSeq], page_tables: np.ndarray, num_decodes: int,
                 no_context: set[int] = frozenset()) -> tuple[AttentionMetadata, np.ndarray]:
        """Attention metadata of `seqs` over `page_tables` ((L, B, max_blocks) pages of this
        device), and the tokens' positions (T,). Rows in `no_context` attend over their new
        tokens only."""
        ps = self.page_size
        query_lens = [len(s.tokens) for s in seqs]
        seq_lens = [len(s.tokens) if i in no_context else s.num_computed + len(s.tokens) for i, s in enumerate(seqs)]
        B = len(seqs)
        pos = np.concatenate([np.arange(s.num_computed, s.num_computed + len(s.tokens)) for s in seqs])  # (T,)
        seq_of_token = np.repeat(np.arange(B), query_lens)  # (T,)
        slots = page_tables[:, seq_of_token, pos // ps].astype(np.int64) * ps + pos % ps  # (L, T)
        qsl = np.zeros(B + 1, dtype=np.int32)  # (B+1,)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            page_tables=torch.from_numpy(page_tables.copy()).to(dev),  # the work's bytes are read-only
            slot_mapping=torch.from_numpy(np.ascontiguousarray(slots)).to(dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return meta, pos

    @torch.inference_mode()
    def forward(self, step: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the layer range on the token ids (first stage) or on `hidden` (T, h) from the
        previous stage. Returns (T, h) hidden states, or on the last stage (R, V) float32 logits
        of the rows that sample (in ascending row order)."""
        self.backend.prepare(step.meta)
        x = self.model.forward(step.inputs if hidden is None else hidden, step.positions, step.meta)  # (T, h)
        if not self.model.last:
            return x
        if not len(step.logits_indices):
            return torch.empty(0, self.config.model.vocab_size, device=self.device)
        return self.model.logits(x[step.logits_indices])  # (R, V)

    @torch.inference_mode()
    def copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """KV page copies (fork of a partial block, relocation before a restore)."""
        if len(src):
            kv = self.pool.kv_cache  # (P, 2, ps, H_kv, d)
            kv[torch.from_numpy(np.asarray(dst, dtype=np.int64)).to(self.device)] = \
                kv[torch.from_numpy(np.asarray(src, dtype=np.int64)).to(self.device)]

    @torch.inference_mode()
    def copy_into_pages(self, pages: list[int], data: torch.Tensor) -> None:
        """Write received KV (n, 2, ps, H_kv, d) into these pages, in order."""
        self.pool.kv_cache[torch.tensor(pages, dtype=torch.long, device=self.device)] = data

    # ------------------------------------------------------------------ drop / restore

    def run_only(self, layers: tuple[int, int], drop: list[str]) -> None:
        """Become a pipeline member running `layers`: the parameter groups in `drop` (those the
        new role does not read) give their pages to the KV side, without a copy. The caller's
        KV accounting takes the same pages (`DevicePool.group_pages`)."""
        needed = set(param_groups(self.config.model, layers))
        if needed & set(drop):
            raise ValueError(f"cannot drop {sorted(needed & set(drop))}: layers {layers} read them")
        for g in drop:
            self.pool.drop(g)
        self.model.set_active(layers)

    @torch.inference_mode()
    def take_back(self, groups: list[str], moves: list[tuple[int, int]]) -> None:
        """Take these dropped groups' pages back: the KV living there moves first (`moves`,
        (src, dst) page copies the KV accounting decided by `reclaim`). The caller then fills
        them with weights (from a peer, or the checkpoint); the device runs what it ran until
        told otherwise."""
        if moves:
            src, dst = zip(*moves)
            self.copy_pages(np.asarray(src), np.asarray(dst))
        for g in groups:
            self.pool.restore(g)

    def drop_layers(self, layers: range, kv: BlockManager) -> int:
        """Free the parameter pages of these layers into the KV side. Returns the pages freed.
        The layers cannot run until restored."""
        freed = 0
        for i in layers:
            pages = self.pool.drop(f"layer.{i}")
            kv.add_pages(pages)
            freed += len(pages)
        return freed

    def can_restore(self, layers: range, kv: BlockManager) -> bool:
        pages = [p for i in layers for p in self.pool.group_pages(f"layer.{i}")]
        return kv.can_reclaim(pages)

    @torch.inference_mode()
    def restore_layers(self, layers: range, kv: BlockManager) -> int:
        """Take the pages of these layers back (moving any KV living there) and reload their
        weights from the checkpoint. Returns the KV pages moved."""
        groups = [f"layer.{i}" for i in layers]
        pages = [p for g in groups for p in self.pool.group_pages(g)]
        moves = kv.reclaim(pages)
        if moves:
            src, dst = zip(*moves)
            self.copy_pages(np.asarray(src), np.asarray(dst))
        for g in groups:
            self.pool.restore(g)
        self.loader.load(self.pool, groups)
        return len(moves)
