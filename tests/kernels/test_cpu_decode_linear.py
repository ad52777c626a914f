"""The CPU decode products (kernels/cpu_decode_linear.c) against an fp64 torch reference.

Awkward shapes on purpose: N not a multiple of the 4-row block, K not a multiple of the 8-lane
vector (the scalar tail), inputs and residuals that are row views of wider tensors (the fused
qkv output), each activation, with and without bias and residual.
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kunlite.kernels import cpu_decode

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                                or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the kernels need x86-64 with AVX2/FMA")


def test_the_kernels_build_here() -> None:
    assert cpu_decode.available()


def reference(x: torch.Tensor, w: torch.Tensor, bias, residual, norm, eps: float, glu: bool) -> torch.Tensor:
    x, w = x.double(), w.double()
    if norm is not None:
        x = F.rms_norm(x, (x.shape[1],), norm.double(), eps)
    if glu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = x @ w.T
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k=st.integers(1, 100),
    act=st.sampled_from(["none", "rms_norm", "silu_glu"]),
    with_bias=st.booleans(),
    with_residual=st.booleans(),
    pad=st.integers(0, 5),  # x and the residual are column slices of wider rows
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_fp64_reference(m: int, n: int, k: int, act: str, with_bias: bool, with_residual: bool,
                                pad: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    width = 2 * k if act == "silu_glu" else k
    x = randn(m, width + pad)[:, pad:]  # (M, width), row stride width + pad
    w = randn(n, k)  # (N, K)
    bias = randn(n) if with_bias else None  # (N,)
    residual = randn(m, n + pad)[:, :n] if with_residual else None  # (M, N) strided
    norm = randn(k) if act == "rms_norm" else None  # (K,)
    eps = 1e-5
    x_before = x.clone()
    y = cpu_decode.linear(x, w, bias=bias, residual=residual, norm=norm, eps=eps, glu=act == "silu_glu")
    want = reference(x, w, bias, residual, norm, eps, act == "silu_glu")  # of the same (bf16) values
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32 accumulation of K products of N(0,1) numbers: error grows like sqrt(K) * 2^-24 * |terms|;
    # a bf16 result adds one rounding (2^-9 relative).
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-3, 2 ** -8)
    torch.testing.assert_close(y.double(), want, atol=atol * max(1.0, k ** 0.5), rtol=rtol)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # inputs are read, never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_glu_saturates_cleanly(dtype: torch.dtype) -> None:
    """Gates far beyond exp's range (|gate| up to 200): silu(gate) -> gate or -0, never NaN/inf.
    W = I, so each output is silu(gate) * 1, vector lanes and the scalar tail (K = 43)."""
    k = 43
    gate = torch.linspace(-200, 200, k).to(dtype)  # (K,)
    x = torch.cat([gate, torch.ones(k, dtype=dtype)]).repeat(6, 1)  # (6, 2K): the tile path
    y = cpu_decode.linear(x, torch.eye(k, dtype=dtype), glu=True)  # (6, K)
    want = F.silu(gate.double()).expand(6, k)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 2 ** -8)


def test_rejects_what_it_cannot_compute() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(AssertionError, match="fp32 or bf16 throughout"):
        cpu_decode.linear(torch.randn(2, 16, dtype=torch.bfloat16), w)
    with pytest.raises(AssertionError, match="fp32 or bf16 throughout"):
        cpu_decode.linear(torch.randn(2, 16, dtype=torch.float16), w.half())
    with pytest.raises(AssertionError, match="does not fit"):
        cpu_decode.linear(torch.randn(2, 15), w)
    with pytest.raises(AssertionError, match="dense"):
        cpu_decode.linear(torch.randn(2, 16), torch.randn(16, 8).T)


def test_an_edit_to_the_source_rebuilds(tmp_path, monkeypatch) -> None:
    """The library is named by a hash of sources and flags: an edited source gets a new file."""
    first = cpu_decode.build(tmp_path)
    assert first.exists() and cpu_decode.build(tmp_path) == first  # built once
    src = tmp_path / "src"
    src.mkdir()
    for p in cpu_decode.SOURCES:
        (src / p.name).write_text(p.read_text())
    (src / "cpu_decode_attention.c").write_text(cpu_decode.SOURCES[2].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_decode, "SOURCES", tuple(src / p.name for p in cpu_decode.SOURCES))
    second = cpu_decode.build(tmp_path)
    assert second != first and second.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # no half-written files


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 700), pad=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_matches_fp64(m: int, k: int, pad: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k + pad, generator=g) * 4).to(dtype)[:, pad:]  # (M, K), strided rows
    w = torch.randn(k, generator=g).to(dtype)  # (K,)
    want = F.rms_norm(x.double(), (k,), w.double(), 1e-6)
    y = cpu_decode.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == (m, k)
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 2 ** -8)
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol)
