"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a contiguous layer range.

The runner of range [l0, l1) embeds tokens only when l0 == 0 and applies the final norm and LM
head only when l1 == L; otherwise hidden states come in and go out. A replica is [0, L).

Parameters are not allocated here: they are views of the device pool, bound by `bind`. They are
grouped for the pool ("embed", "layer.{i}", "head") so that a layer's pages can be dropped
and restored as a unit. q/k/v and gate/up are fused into one matrix each: one pass over the
weights per projection instead of three (or two), which is where decode speed comes from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kunlite.config import ModelConfig
from kunlite.engine.memory import DevicePool
from kunlite.kernels import cpu_decode
from kunlite.kernels.backend import AttentionBackend, AttentionMetadata

ParamShapes = dict[str, list[tuple[str, tuple[int, ...]]]]


def layer_group(i: int) -> str:
    return f"layer.{i}"


def param_groups(cfg: ModelConfig, layers: tuple[int, int]) -> ParamShapes:
    """The parameter groups a worker of this layer range holds, with their shapes."""
    l0, l1 = layers
    h, last = cfg.hidden_size, l1 == cfg.num_layers
    groups: ParamShapes = {}
    if l0 == 0 or (last and cfg.tie_word_embeddings):
        groups["embed"] = [("embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(l0, l1):
        g = [("input_layernorm.weight", (h,)), ("qkv_proj.weight", (cfg.qkv_size, h))]
        if cfg.attention_bias:
            g.append(("qkv_proj.bias", (cfg.qkv_size,)))
        g += [("o_proj.weight", (h, cfg.q_size)), ("post_attention_layernorm.weight", (h,)),
              ("gate_up_proj.weight", (2 * cfg.intermediate_size, h)),
              ("down_proj.weight", (h, cfg.intermediate_size))]
        groups[layer_group(i)] = g
    if last:
        groups["head"] = [("norm.weight", (h,))]
        if not cfg.tie_word_embeddings:
            groups["head"].append(("lm_head.weight", (cfg.vocab_size, h)))
    return groups


def needed_groups(cfg: ModelConfig, layers: tuple[int, int]) -> list[str]:
    """The parameter groups a device running `layers` reads (param_groups' names)."""
    return list(param_groups(cfg, layers))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:  # (d/2,) float64
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band in
        # between is interpolated smoothly.
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv


class LayerDroppedError(RuntimeError):
    """A forward pass over a layer whose parameters were dropped from this device."""


class Rope:
    """Rotary embedding in HF's rotate-half layout, with a cos/sin table for every position.

    rotate_half(x) = [-x2, x1] = roll(x, d/2) * [-1 .. -1, 1 .. 1], so the table keeps sin with
    its first half negated and each application is one roll and two multiply-adds.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv = rope_inv_freq(cfg).float()  # (d/2,)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)  # (N, d/2)
        self.cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1).to(device=device, dtype=dtype)  # (N, d)
        self.sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(device=device, dtype=dtype)  # (N, d)
        self.half = cfg.head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per step: cos and signed sin at the step's positions, each (T, 1, d)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, H, d) -> (T, H, d)
        return torch.addcmul(x * cos, x.roll(self.half, dims=-1), sin)


class Linear:
    """The model's matrix products, with two CPU paths where torch's is slow.

    - fp32 or bf16 weights, up to `native_max_rows` rows (decode):
      `kernels.cpu_decode`, which streams fp32 weights at about twice the rate of torch's (MKL)
      matrix-vector product on AMD CPUs, widens bf16 in registers instead of into the scratch
      buffer, and fuses the RMS norm before a projection and the SiLU-GLU before the down
      projection.
    - half-precision weights on processors without bf16 units: a bf16 matrix-vector product
      streams the weights well, but a bf16 matrix product runs at a fraction of fp32's rate. So
      once a batch has `upcast_min_rows` rows, the weight is widened into an fp32 scratch buffer
      (one per model, sized for the largest matrix, small enough to stay in cache) and multiplied
      in fp32. Inputs and outputs keep the model dtype.
    Every path computes the same function; only the rounding differs.
    """

    def __init__(self, max_numel: int, device: torch.device, dtype: torch.dtype, upcast_min_rows: int,
                 native_max_rows: int = 32) -> None:
        self.cpu = device.type == "cpu"
        self.upcast = self.cpu and dtype in (torch.bfloat16, torch.float16) and upcast_min_rows > 0
        self.min_rows = upcast_min_rows
        self.scratch = torch.empty(max_numel if self.upcast else 0, dtype=torch.float32)  # (max_numel,)
        native = self.cpu and dtype in (torch.float32, torch.bfloat16) and cpu_decode.available()
        self.native_rows = range(1, native_max_rows + 1) if native else range(0)  # rows that take them

    def wide(self, x: torch.Tensor, w: torch.Tensor, *, chunk_rows: int = 4096) -> torch.Tensor:
        """x @ w.T for a tall w (the LM head: V rows): on CPU, in row chunks, each fits in cache
        (and, widened, in the scratch buffer). Measured here at 32 rows x 49152: 28.5 -> 23.4 ms.
        x: (M, K), w: (N, K) -> (M, N) in x's dtype."""
        if not self.cpu or x.shape[0] < self.min_rows or w.shape[0] <= chunk_rows:
            return self(x, w)
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32 if self.upcast else x.dtype)  # (M, N)
        xin = x.float() if self.upcast else x
        for start in range(0, w.shape[0], chunk_rows):
            part = w[start : start + chunk_rows]  # (n, K) view of the pool
            if self.upcast:
                part = self.scratch[: part.numel()].view(part.shape).copy_(part)  # (n, K) fp32
            torch.mm(xin, part.t(), out=out[:, start : start + part.shape[0]])
        return out

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        # x: (M, K), w: (N, K) -> (M, N)
        if x.shape[0] in self.native_rows:
            return cpu_decode.linear(x, w, bias=b)
        if not self.upcast or x.shape[0] < self.min_rows:
            return F.linear(x, w, b)
        wf = self.scratch[: w.numel()].view(w.shape).copy_(w)  # (N, K) fp32
        return F.linear(x.float(), wf, None if b is None else b.float()).to(x.dtype)

    def normed(self, x: torch.Tensor, norm: torch.Tensor, eps: float, w: torch.Tensor,
               b: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) @ w.T (+ b). x: (M, K), norm: (K,), w: (N, K) -> (M, N)"""
        if x.shape[0] in self.native_rows:
            return cpu_decode.linear(x, w, bias=b, norm=norm, eps=eps)
        return self(self.rms_norm(x, norm, eps), w, b)

    def rms_norm(self, x: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
        """x: (M, K), norm: (K,) -> (M, K). A few rows take the native kernel: torch's bf16
        rms_norm is ~10 ops, 58 us a row here."""
        if self.native_rows and x.shape[0] <= 4:
            return cpu_decode.rms_norm(x, norm, eps)
        return F.rms_norm(x, (x.shape[1],), norm, eps)

    def residual(self, r: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """r + x @ w.T in one product (BLAS beta = 1). r: (M, N), x: (M, K), w: (N, K)."""
        if x.shape[0] in self.native_rows:
            return cpu_decode.linear(x, w, residual=r)
        if not self.upcast or x.shape[0] < self.min_rows:
            return torch.addmm(r, x, w.t())
        wf = self.scratch[: w.numel()].view(w.shape).copy_(w)  # (N, K) fp32
        return torch.addmm(r.float(), x.float(), wf.t()).to(r.dtype)

    def glu_residual(self, r: torch.Tensor, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """r + (silu(gate) * up) @ w.T. r: (M, N), gate_up: (M, 2K) [gate | up], w: (N, K)."""
        if gate_up.shape[0] in self.native_rows:
            return cpu_decode.linear(gate_up, w, residual=r, glu=True)
        gate, up = gate_up.chunk(2, dim=-1)  # (M, K) each
        return self.residual(r, F.silu(gate) * up, w)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, local_index: int, backend: AttentionBackend, rope: Rope,
                 linear: Linear) -> None:
        self.cfg = cfg
        self.local_index = local_index  # index into the per-step page tables
        self.backend = backend
        self.rope = rope
        self.linear = linear
        self.eps = cfg.rms_norm_eps
        self.qk = cfg.q_size + cfg.kv_size

    def bind(self, pool: DevicePool, group: str, attention_bias: bool) -> None:
        v = lambda name: pool.view(group, name)  # noqa: E731
        self.in_norm = v("input_layernorm.weight")  # (h,)
        self.w_qkv = v("qkv_proj.weight")  # (q + 2kv, h)
        self.b_qkv = v("qkv_proj.bias") if attention_bias else None  # (q + 2kv,)
        self.w_o = v("o_proj.weight")  # (h, q)
        self.post_norm = v("post_attention_layernorm.weight")  # (h,)
        self.w_gate_up = v("gate_up_proj.weight")  # (2I, h)
        self.w_down = v("down_proj.weight")  # (h, I)

    def forward(
        self,
        x: torch.Tensor,  # (T, h) residual stream
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin at the step's positions: (T, 1, d) each
        kv_cache: torch.Tensor,  # (P, 2, ps, H_kv, d)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, h)
        cfg, linear = self.cfg, self.linear
        T = x.shape[0]
        qkv = linear.normed(x, self.in_norm, self.eps, self.w_qkv, self.b_qkv)  # (T, q + 2kv)
        qk = self.rope.apply(qkv[:, : self.qk].view(T, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim), *rope)
        q = qk[:, : cfg.num_heads]  # (T, H_q, d)
        k = qk[:, cfg.num_heads :]  # (T, H_kv, d)
        v = qkv[:, self.qk :].view(T, cfg.num_kv_heads, cfg.head_dim)  # (T, H_kv, d)
        o = self.backend.forward(q, k, v, kv_cache, self.local_index, meta)  # (T, H_q, d)
        if meta.remote is not None:  # rows whose KV of this layer is on another device
            o = meta.remote(self.local_index, q, k, v, o)  # (T, H_q, d)
        x = linear.residual(x, o.reshape(T, cfg.q_size), self.w_o)  # (T, h)
        gate_up = linear.normed(x, self.post_norm, self.eps, self.w_gate_up)  # (T, 2I)
        return linear.glu_residual(x, gate_up, self.w_down)  # (T, h)


class CausalLM:
    """The layers [l0, l1) of one model, bound to one device pool.

    It runs its *active* range, [l0, l1) unless `set_active` narrowed it: after a drop, a
    device of a pipeline group runs only its share of the layers it holds the pages for. The
    first and last roles (embedding, final norm and LM head) follow the active range.
    """

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], backend: AttentionBackend,
                 pool: DevicePool, rope: Rope, *, upcast_min_rows: int = 4) -> None:
        self.cfg = cfg
        self.l0, self.l1 = layers
        self.rope = rope
        # The scratch holds the largest layer matrix, or a 4096-row chunk of the LM head.
        largest = max(s.numel for g, layout in pool.layouts.items() if g.startswith("layer.") for s in layout.slots)
        largest = max([largest, 4096 * cfg.hidden_size])
        self.linear = Linear(largest, pool.storage.device, pool.storage.dtype, upcast_min_rows)
        self.all_layers = [DecoderLayer(cfg, i - self.l0, backend, rope, self.linear) for i in range(self.l0, self.l1)]
        self.pool = pool
        self.set_active((self.l0, self.l1))
        self.bind()

    def set_active(self, layers: tuple[int, int]) -> None:
        """Run only `layers` (inside [l0, l1)) from now on."""
        lo, hi = layers
        if not self.l0 <= lo < hi <= self.l1:
            raise ValueError(f"active layers {layers} are not inside [{self.l0}, {self.l1})")
        self.active = (lo, hi)
        self.first = lo == 0
        self.last = hi == self.cfg.num_layers
        self.layers = self.all_layers[lo - self.l0 : hi - self.l0]
        for i, layer in enumerate(self.layers):
            layer.local_index = i  # rows of the step's page tables cover the active layers
        self.groups = needed_groups(self.cfg, self.active)  # every group a forward (and the LM head) reads

    def bind(self) -> None:
        """(Re)take the parameter views from the pool; called after a restore."""
        pool = self.pool
        if "embed" in pool.layouts:
            self.embed = pool.view("embed", "embed_tokens.weight")  # (V, h)
        for i, layer in zip(range(self.l0, self.l1), self.all_layers):
            layer.bind(pool, layer_group(i), self.cfg.attention_bias)
        if "head" in pool.layouts:
            self.norm = pool.view("head", "norm.weight")  # (h,)
            self.lm_head = self.embed if self.cfg.tie_word_embeddings else pool.view("head", "lm_head.weight")  # (V, h)

    def forward(
        self,
        inputs: torch.Tensor,  # (T,) token ids when first, else (T, h) hidden states
        positions: torch.Tensor,  # (T,)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, h) hidden states after the last local layer (pre-norm)
        dropped = [g for g in self.groups if not self.pool.is_resident(g)]
        if dropped:
            # Their pages may hold KV by now: running them would compute with whatever is there.
            raise LayerDroppedError(f"cannot run {', '.join(dropped)}: dropped from this device "
                                    "(restore them, or run them on the device that holds them)")
        x = F.embedding(inputs, self.embed) if self.first else inputs  # (T, h)
        kv_cache = self.pool.kv_cache
        rope = self.rope.tables(positions)
        for layer in self.layers:
            x = layer.forward(x, rope, kv_cache, meta)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (R, h) rows to sample -> (R, V) float32 logits."""
        if hidden.shape[0] in self.linear.native_rows:
            return self.linear.normed(hidden, self.norm, self.cfg.rms_norm_eps, self.lm_head).float()  # (R, V)
        h = self.linear.rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)  # (R, h)
        return self.linear.wide(h, self.lm_head).float()  # (R, V)
