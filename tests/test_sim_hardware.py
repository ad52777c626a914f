"""`sim/hardware.py`: device profiles and the analytic roofline step cost, by hand."""

from __future__ import annotations

import pytest

from kunlite.config import ModelConfig
from kunlite.engine.sizing import model_params
from kunlite.engine.step_cost import FittedStepCost, StepCost, StepCostWeights
from kunlite.sim.hardware import DEVICES, AnalyticStepCost, DeviceSpec, get_device
from kunlite.sim.model_configs import load_model_config

TOY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=8,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False)
UNIT = DeviceSpec("unit", bf16_flops=1e3, hbm_bandwidth=1e3, memory_bytes=1 << 30, nvlink_bandwidth=1.0,
                  pcie_bandwidth=1.0, ib_bandwidth=1.0, flops_efficiency=1.0, bandwidth_efficiency=1.0,
                  step_overhead_s=0.0)


def test_toy_model_by_hand() -> None:
    # One sequence: q=3 new tokens on c=5 cached. T=3, A=3*5+6=21, KV touched 8 tokens.
    # Layer params: norms 2*4 + qkv 8*4 + o 4*4 + gate_up 16*4 + down 4*8 = 152.
    # linear:    flops 2 layers * 2 * 152 * 3 = 1824; bytes 2 * (152 + 3 * act) * 2 with
    #            act = 4*4 + 8 + 4 + 3*8 = 52, so 1232 -> compute-bound: 1.824 s
    # attention: flops 2 * 4 * 21 * 2 * 2 = 672; bytes 2 * 8 * 2 * 2 * 2 = 128 -> 0.672 s
    # ends:      embed 3*4*2 = 24 bytes; head 2*10*4 = 80 flops, 10*4*2 + (4*2 + 10*4) = 128
    #            bytes -> memory-bound: 0.152 s
    cost = AnalyticStepCost(TOY, UNIT, elem_bytes=2)
    w = cost.work([(3, 5)], (0, 2))
    assert (w.linear.flops, w.linear.bytes) == (1824, 1232)
    assert (w.attention.flops, w.attention.bytes) == (672, 128)
    assert (w.ends.flops, w.ends.bytes) == (80, 152)
    assert cost.step_seconds([(3, 5)], (0, 2)) == pytest.approx(1.824 + 0.672 + 0.152)
    # The first stage alone: one layer and the embedding, no head.
    assert cost.step_seconds([(3, 5)], (0, 1)) == pytest.approx(0.912 + 0.336 + 0.024)


def test_decode_of_one_sequence_is_bound_by_reading_the_weights() -> None:
    cfg, h100 = load_model_config("llama-3-8b"), get_device("h100")
    t = AnalyticStepCost(cfg, h100).step_seconds([(1, 0)], (0, cfg.num_layers))
    # Every weight but the embedding table (one row is gathered) is read once: 15.0 GB at
    # 2.68 TB/s, 5.6 ms.
    weights_s = (model_params(cfg) - cfg.vocab_size * cfg.hidden_size) * 2 / (3350e9 * 0.8)
    assert t == pytest.approx(weights_s + 0.002, rel=0.01)


def test_long_prefill_is_bound_by_compute() -> None:
    cfg = load_model_config("llama-3-8b")
    h100, h200 = (AnalyticStepCost(cfg, get_device(n)) for n in ("h100", "h200"))
    chunk = [(4096, 0)]
    w = h100.work(chunk, (0, 32))
    assert w.linear.seconds(h100.device) == pytest.approx(w.linear.flops / (989.4e12 * 0.6))
    assert w.linear.flops == pytest.approx(2 * 32 * 218_112_000 * 4096)
    # Same compute on an H200: a compute-bound step takes as long; a decode batch is faster.
    assert h200.step_seconds(chunk, (0, 32)) == pytest.approx(h100.step_seconds(chunk, (0, 32)), rel=0.01)
    decode = [(1, 2000)] * 64
    assert h200.step_seconds(decode, (0, 32)) < 0.8 * h100.step_seconds(decode, (0, 32))


@pytest.mark.parametrize("model", ["llama-3-70b", "qwen2.5-72b"])
def test_pipeline_stages_add_up_to_the_whole_model(model: str) -> None:
    cfg = load_model_config(model)
    cost = AnalyticStepCost(cfg, get_device("a800"))
    batch = [(1, 700)] * 24 + [(256, 1024)]
    stages = [(0, 20), (20, 45), (45, 80)]
    overhead = cost.device.step_overhead_s
    whole = cost.step_seconds(batch, (0, 80)) - overhead
    assert sum(cost.step_seconds(batch, s) - overhead for s in stages) == pytest.approx(whole)


def test_more_work_never_takes_less_time() -> None:
    cost = AnalyticStepCost(load_model_config("qwen2.5-14b"), get_device("h800"))
    full = (0, 48)
    t = [cost.step_seconds([(1, c)] * 32, full) for c in (0, 512, 4096, 16384)]
    assert t == sorted(t) and t[-1] > t[0]
    p = [cost.step_seconds([(q, 0)], full) for q in (16, 256, 2048, 8192)]
    assert p == sorted(p) and p[-1] > p[0]


def test_both_cost_models_share_one_interface() -> None:
    cfg = load_model_config("llama-3-8b")
    models: list[StepCost] = [AnalyticStepCost(cfg, get_device("h200")),
                              FittedStepCost(StepCostWeights(1e-4, 1e-8, 1e-4, 1e-3), cfg.num_layers)]
    for m in models:
        assert m.step_seconds([(1, 10), (64, 0)], (8, 16)) > 0
        with pytest.raises(ValueError):
            m.step_seconds([(1, 10)], (16, 33))


def test_device_table() -> None:
    assert set(DEVICES) == {"a800", "h800", "h100", "h200"}
    assert get_device("A800-SXM4-80GB").nvlink_bandwidth == 200e9  # 400 GB/s both ways
    assert get_device("h100").nvlink_bandwidth == 450e9 and get_device("h800").nvlink_bandwidth == 200e9
    assert get_device("h200").memory_bytes > get_device("h100").memory_bytes
    assert get_device("h100", flops_efficiency=0.5).flops == pytest.approx(989.4e12 * 0.5)
    assert get_device("h100").pool_bytes() == int(81559 * 2**20 * 0.9) - 2**30
    with pytest.raises(ValueError):
        get_device("b200")
