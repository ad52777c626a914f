"""Analytic GPU profiles and the analytic step cost (a roofline per operator class).

Device figures are the vendors' published peaks; the efficiency factors turn them into what
serving kernels sustain. Sources:

- A100/A800 SXM4 80GB: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
  BF16 tensor 312 TFLOP/s dense (624 with sparsity), HBM2e 2,039 GB/s, NVLink 600 GB/s,
  PCIe Gen4 64 GB/s. The A800 is the same part with NVLink cut to 400 GB/s (NVIDIA A800
  product page).
- H100 SXM5 80GB: NVIDIA H100 datasheet: BF16 1,979 TFLOP/s with sparsity, so 989.4 dense;
  HBM3 3.35 TB/s; NVLink 900 GB/s; PCIe Gen5 128 GB/s. The H800 SXM5 is the same part with
  NVLink cut to 400 GB/s (NVIDIA H800 product page).
- H200 SXM 141GB: NVIDIA H200 datasheet: same compute as H100 (989.4 dense), HBM3e 4.8 TB/s,
  NVLink 900 GB/s, PCIe Gen5 128 GB/s.
- Memory sizes are what nvidia-smi reports: 81920 MiB (A100/A800 80GB), 81559 MiB (H100/H800),
  143771 MiB (H200).
- NVLink and PCIe figures are quoted bidirectional, so one direction (what a point-to-point
  copy gets) is half: e.g. 300 GB/s for the A100's 600. InfiniBand is one NIC per GPU, quoted
  per direction: HDR 200 Gb/s = 25 GB/s in DGX A100-class nodes, NDR 400 Gb/s = 50 GB/s in
  DGX H100/H200-class nodes (H800 clusters are built with NDR too).

Efficiencies (assumptions, each a field to change): 0.6 of peak FLOP/s (large bf16 GEMMs reach
about 0.8 on an H200 here, 790 of 989 TFLOP/s, but serving GEMMs have few rows and attention
kernels reach less; 0.6 sits in the usual 0.5-0.7 range); 0.8 of HBM bandwidth (streaming
kernels reach 0.8-0.9); a fixed 2 ms per step per device (scheduling, launches, sampling).

Pure: plain numbers in, seconds out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from kunlite.config import ModelConfig
from kunlite.engine.sizing import layer_params
from kunlite.engine.step_cost import Batch, step_features

GB = 1e9
MIB = 1 << 20


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int
    nvlink_bandwidth: float  # bytes/s, one direction, per GPU
    pcie_bandwidth: float  # bytes/s, one direction (host <-> device)
    ib_bandwidth: float  # bytes/s, one direction, per GPU (across nodes)
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.002

    @property
    def flops(self) -> float:
        """Sustained FLOP/s."""
        return self.bf16_flops * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        """Sustained HBM bytes/s."""
        return self.hbm_bandwidth * self.bandwidth_efficiency

    def pool_bytes(self, utilization: float = 0.9, workspace: int = 1 << 30) -> int:
        """The unified pool a kunlite worker takes on this device by default (as
        `runner.default_device_memory` does on CUDA: a share of the memory, less a workspace)."""
        return int(self.memory_bytes * utilization) - workspace


def _ampere(name: str, nvlink_bidirectional: float) -> DeviceSpec:
    return DeviceSpec(name, bf16_flops=312e12, hbm_bandwidth=2039 * GB, memory_bytes=81920 * MIB,
                      nvlink_bandwidth=nvlink_bidirectional / 2, pcie_bandwidth=64 * GB / 2,
                      ib_bandwidth=25 * GB)


def _hopper(name: str, hbm: float, memory_mib: int, nvlink_bidirectional: float) -> DeviceSpec:
    return DeviceSpec(name, bf16_flops=989.4e12, hbm_bandwidth=hbm, memory_bytes=memory_mib * MIB,
                      nvlink_bandwidth=nvlink_bidirectional / 2, pcie_bandwidth=128 * GB / 2,
                      ib_bandwidth=50 * GB)


DEVICES: dict[str, DeviceSpec] = {
    "a800": _ampere("A800-SXM4-80GB", nvlink_bidirectional=400 * GB),
    "h800": _hopper("H800-SXM5-80GB", hbm=3350 * GB, memory_mib=81559, nvlink_bidirectional=400 * GB),
    "h100": _hopper("H100-SXM5-80GB", hbm=3350 * GB, memory_mib=81559, nvlink_bidirectional=900 * GB),
    "h200": _hopper("H200-SXM-141GB", hbm=4800 * GB, memory_mib=143771, nvlink_bidirectional=900 * GB),
}


def get_device(name: str, **overrides: float) -> DeviceSpec:
    """A built-in profile by short name (a800, h800, h100, h200; any case, "-sxm..." ignored),
    with fields overridden (e.g. flops_efficiency=0.5)."""
    key = name.strip().lower().split("-")[0]
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r} (built-in: {', '.join(DEVICES)})")
    return replace(DEVICES[key], **overrides)


@dataclass(frozen=True)
class Work:
    """FLOPs and HBM bytes of one operator class in one step on one device."""

    flops: float = 0.0
    bytes: float = 0.0

    def seconds(self, device: DeviceSpec) -> float:
        """Roofline: bound by compute or by memory, whichever is slower."""
        return max(self.flops / device.flops, self.bytes / device.bandwidth)


@dataclass(frozen=True)
class StepWork:
    linear: Work  # projections and FFN of the held layers
    attention: Work  # attention over the KV of the held layers
    ends: Work  # embedding gather (first stage) and LM head (last stage)


@dataclass(frozen=True)
class AnalyticStepCost:
    """`StepCost` from a roofline of each operator class on a `DeviceSpec`.

    Per decoder layer, for a batch with T tokens, A attention pairs and sum(c_i + q_i) = K
    tokens of KV touched:
        linear:    2 * P_layer * T FLOPs; P_layer * e weight bytes + T * act * e activation
                   bytes, act = 4h + qkv + q + 3I (each projection's input and output)
        attention: 4 * A * d * H_q FLOPs (QK^T and PV); K * 2 * H_kv * d * e bytes of KV
    The stage holding layer 0 gathers T embedding rows; the one holding the last layer runs
    the LM head for every sequence (2 * V * h FLOPs each; its V * h weights, fp32 logits): an
    approximation, as a prefill chunk that does not end its prompt samples nothing. Each
    class is bound by FLOPs or bytes separately (a mixed step is compute-bound in its
    projections and memory-bound in its decode attention), and the classes add up:

        step_seconds = sum over classes of max(flops / sustained FLOP/s,
                                               bytes / sustained bandwidth) + step overhead

    Whole layers are alike, so the stages of a pipeline add up to the whole model plus one
    overhead per stage. Tensor parallelism is not modelled.
    """

    model: ModelConfig
    device: DeviceSpec
    elem_bytes: int = 2

    @cached_property
    def _layer_params(self) -> int:
        return layer_params(self.model)

    def work(self, batch: Batch, layers: tuple[int, int]) -> StepWork:
        t, a, b, _ = step_features(batch)
        return self._work(t, a, b, sum(q + c for q, c in batch), layers)

    def _work(self, t: int, a: int, b: int, kv_tokens: int, layers: tuple[int, int]) -> StepWork:
        """The work of a batch of t tokens, a attention pairs, b sequences, kv_tokens KV read."""
        f = self._terms(t, a, b, kv_tokens, layers)
        return StepWork(Work(f[0], f[1]), Work(f[2], f[3]), Work(f[4], f[5]))

    def _terms(self, t: Any, a: Any, b: int, kv_tokens: Any, layers: tuple[int, int]) -> tuple[Any, ...]:
        """(FLOPs, bytes) of the linear layers, the attention and the ends, flattened (numbers,
        or arrays for decode_steps_seconds): `_work` without the dataclasses."""
        cfg, e = self.model, self.elem_bytes
        l0, l1 = self._check(layers)
        n = l1 - l0
        h, inter = cfg.hidden_size, cfg.intermediate_size
        act = 4 * h + cfg.qkv_size + cfg.q_size + 3 * inter
        ends_flops = ends_bytes = 0.0
        if l0 == 0:
            ends_bytes += t * h * e
        if l1 == cfg.num_layers:
            ends_flops += 2.0 * cfg.vocab_size * h * b
            ends_bytes += cfg.vocab_size * h * e + b * (h * e + cfg.vocab_size * 4)
        return (n * 2.0 * self._layer_params * t, n * (self._layer_params + t * act) * e,
                n * 4.0 * a * cfg.head_dim * cfg.num_heads, n * kv_tokens * 2.0 * cfg.kv_size * e,
                ends_flops, ends_bytes)

    def step_seconds(self, batch: Batch, layers: tuple[int, int]) -> float:
        t, a, b, _ = step_features(batch)
        return self._seconds(self._terms(t, a, b, sum(q + c for q, c in batch), layers))

    def decode_steps_seconds(self, num_seqs: int, context_sum: int, steps: int,
                             layers: tuple[int, int]) -> np.ndarray:
        """(steps,) step_seconds of num_seqs decodes (q = 1) whose contexts sum to context_sum
        in the first step and grow by one each a step, without the batches (the simulator's
        fast-forward); the same floats, the same operations in the same order."""
        n = num_seqs
        ctx = context_sum + n * np.arange(steps, dtype=np.int64)  # (steps,) context sums
        w = self._work(n, ctx + n, n, ctx + n, layers)  # attention over arrays; the rest scalars
        d = self.device

        def sec(x: Work) -> Any:
            return np.maximum(x.flops / d.flops, x.bytes / d.bandwidth)

        return sec(w.linear) + sec(w.attention) + sec(w.ends) + d.step_overhead_s

    def decode_step_seconds(self, num_seqs: int, context_sum: int, layers: tuple[int, int]) -> float:
        """step_seconds of num_seqs decodes (q = 1) whose contexts sum to context_sum, without
        the batch; the same float (`decode_seconds_at`)."""
        return self.decode_seconds_at(num_seqs, layers)(context_sum)

    def decode_seconds_at(self, num_seqs: int, layers: tuple[int, int]) -> Callable[[int], float]:
        """decode_step_seconds(num_seqs, context_sum, layers) as a function of context_sum:
        `_terms` and `_seconds` with what depends on the batch size and the layers alone
        computed once, the same operations in the same order (a pipeline window costs every
        stage of every step it runs ahead, a stream's sequences the same for many steps)."""
        k = self._decode_consts.get(layers)
        if k is None:
            k = self._decode_consts[layers] = self._layer_consts(layers)
        n_l, lf, act, af, first, last, h, e, v, kvs, head_dim, heads = k
        n = num_seqs
        d = self.device
        flops, bandwidth, overhead = d.flops, d.bandwidth, d.step_overhead_s
        ends_flops = ends_bytes = 0.0
        if first:
            ends_bytes += n * h * e
        if last:
            ends_flops += 2.0 * v * h * n
            ends_bytes += v * h * e + n * (h * e + v * 4)
        linear = max(lf * n / flops, n_l * (self._layer_params + n * act) * e / bandwidth)
        ends = max(ends_flops / flops, ends_bytes / bandwidth)

        def seconds(context_sum: int) -> float:
            a = context_sum + n  # attention pairs, and KV tokens read
            return linear + max(af * a * head_dim * heads / flops, n_l * a * 2.0 * kvs * e / bandwidth) + ends + \
                overhead

        return seconds

    @cached_property
    def _decode_consts(self) -> dict[tuple[int, int], tuple[Any, ...]]:
        return {}

    def _layer_consts(self, layers: tuple[int, int]) -> tuple[Any, ...]:
        """What `_terms` computes from the layers alone, for decode_step_seconds."""
        cfg, e = self.model, self.elem_bytes
        l0, l1 = self._check(layers)
        n = l1 - l0
        h = cfg.hidden_size
        act = 4 * h + cfg.qkv_size + cfg.q_size + 3 * cfg.intermediate_size
        return (n, n * 2.0 * self._layer_params, act, n * 4.0, l0 == 0, l1 == cfg.num_layers, h, e, cfg.vocab_size,
                cfg.kv_size, cfg.head_dim, cfg.num_heads)

    def _check(self, layers: tuple[int, int]) -> tuple[int, int]:
        l0, l1 = layers
        if not 0 <= l0 < l1 <= self.model.num_layers:
            raise ValueError(f"layer range {layers} is not inside [0, {self.model.num_layers})")
        return l0, l1

    def _seconds(self, terms: tuple[float, ...]) -> float:
        """Each class's Work.seconds, added up, plus the step overhead."""
        lf, lb, af, ab, ef, eb = terms
        d = self.device
        flops, bandwidth = d.flops, d.bandwidth
        return max(lf / flops, lb / bandwidth) + max(af / flops, ab / bandwidth) + max(ef / flops, eb / bandwidth) + \
            d.step_overhead_s
