"""The CPU decode path's kernels, from `cpu_decode_linear.c` and `cpu_decode_attention.c`
(helpers in `cpu_decode.h`), built on first use.

The C files are compiled with the system C compiler (`$CC`, else `cc`) into one library in
`$KUNLITE_HOME/build/` the first time it is needed (about a second), named by a hash of the
sources and flags so that an edit rebuilds it; the build is written to a temporary name and
renamed, so a crash never leaves a half-written library. Without a compiler, off x86-64, on a
CPU without AVX2/FMA, or with `KUNLITE_CPU_DECODE=0`, `available()` is False and callers keep
torch's path.

Three entry points:
- `linear`: Y = act(X) @ W.T (+ bias) (+ residual), act one of none, rms_norm (weight `norm`,
  `eps`) and SiLU-GLU (X holds [gate | up]); for the few rows of a decode step. All operands
  fp32, or all bf16 (widened in registers, summed in fp32, the result rounded once).
- `paged_decode_attention`: one query per sequence over the paged pool (fp32 or bf16), read in
  place.
- `rms_norm`: a few rows (fp32 or bf16), serially: the norm before a product that stays torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "KUNLITE_CPU_DECODE"
HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_decode.h", HERE / "cpu_decode_linear.c", HERE / "cpu_decode_attention.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
ACT_NONE, ACT_RMS_NORM, ACT_SILU_GLU = 0, 1, 2
_DTYPES = (torch.float32, torch.bfloat16)

_lib: ctypes.CDLL | None = None
_tried = False


def _supported() -> bool:
    if os.environ.get(ENV, "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(build_dir: Path | None = None) -> Path:
    """Compile the library (if this source and these flags have not been built yet) and return
    its path. Raises RuntimeError naming the compiler's complaint."""
    if build_dir is None:
        from kunlite.engine.pull import kunlite_home

        build_dir = kunlite_home() / "build"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    blob = b"".join(p.name.encode() + p.read_bytes() for p in SOURCES)
    digest = hashlib.blake2b(blob + " ".join((cc, *CFLAGS)).encode(), digest_size=8).hexdigest()
    target = build_dir / f"cpu_decode-{digest}.so"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        c_files = [str(p) for p in SOURCES if p.suffix == ".c"]
        include = f"-I{SOURCES[0].parent}"
        proc = subprocess.run([cc, *CFLAGS, include, *c_files, "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {', '.join(p.name for p in SOURCES)}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if not _supported():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("CPU decode kernels unavailable, using torch's products: %s", e)
        return None
    fn = lib.kl_gemv_f32
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int] + [ctypes.c_long] * 6
    fn.restype = ctypes.c_int
    lib.kl_gemv_bf16.argtypes, lib.kl_gemv_bf16.restype = fn.argtypes, ctypes.c_int
    attn = lib.kl_paged_decode
    attn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_long] * 5 + [ctypes.c_float, ctypes.c_int]
    attn.restype = ctypes.c_int
    lib.kl_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int]
    lib.kl_rms_norm.restype = None
    _lib = lib
    return lib


def available() -> bool:
    """Whether `linear` can run here (builds the library on the first call)."""
    return _load() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(
    x: torch.Tensor,  # (M, K), or (M, 2K) [gate | up] with glu
    w: torch.Tensor,  # (N, K) fp32 or bf16 (as every operand), contiguous
    *,
    bias: torch.Tensor | None = None,  # (N,)
    residual: torch.Tensor | None = None,  # (M, N), added to the product
    norm: torch.Tensor | None = None,  # (K,): RMS-normalise each x row with this weight first
    eps: float = 0.0,
    glu: bool = False,  # x rows are [gate | up]; the product's input is silu(gate) * up
) -> torch.Tensor:  # (M, N) in w's dtype
    # Called ~120 times a decode step: the checks below (what memory safety needs) cost ~5 us.
    lib = _lib if _lib is not None else _load()
    if lib is None:
        raise RuntimeError("the CPU decode kernels are not available here; check available() first")
    N, K = w.shape
    M, width = x.shape
    assert not (glu and norm is not None), "one activation at a time"
    dtype = w.dtype
    assert x.dtype == dtype and dtype in _DTYPES, f"fp32 or bf16 throughout, got x {x.dtype}, w {w.dtype}"
    assert x.is_cpu and w.is_cpu and w.is_contiguous(), "CPU tensors, W rows dense"
    assert width == (2 * K if glu else K), f"x {tuple(x.shape)} does not fit W {(N, K)}"
    if x.stride(1) != 1:
        x = x.contiguous()
    for t, shape in ((bias, (N,)), (norm, (K,))):
        assert t is None or (t.shape == shape and t.dtype == dtype and t.is_contiguous())
    if residual is not None:
        assert residual.shape == (M, N) and residual.dtype == dtype
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    y = torch.empty(M, N, dtype=dtype)  # (M, N)
    act = ACT_SILU_GLU if glu else ACT_RMS_NORM if norm is not None else ACT_NONE
    fn = lib.kl_gemv_f32 if dtype is torch.float32 else lib.kl_gemv_bf16
    rc = fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), _ptr(bias), _ptr(residual), _ptr(norm),
            eps, act, M, N, K, x.stride(0), N, 0 if residual is None else residual.stride(0))
    if rc != 0:
        raise MemoryError("CPU decode kernel: no memory for the activation buffer")
    return y


def supports_attention(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether `paged_decode_attention` takes these operands (else use torch's path)."""
    return (q.dtype == kv_cache.dtype and q.dtype in _DTYPES and q.is_cpu and kv_cache.is_cpu
            and kv_cache.is_contiguous() and q.shape[-1] % 8 == 0 and available())


def paged_decode_attention(
    q: torch.Tensor,  # (B, H_q, d) fp32 or bf16
    kv_cache: torch.Tensor,  # (P, 2, ps, H_kv, d) in q's dtype, contiguous
    page_table: torch.Tensor,  # (B, >= max pages) int32: this layer's page ids
    seq_lens: torch.Tensor,  # (B,) int32, 1 <= len <= pages in the row * ps
    scale: float,
) -> torch.Tensor:  # (B, H_q, d) in q's dtype
    """softmax(q k^T * scale) v per sequence and query head, keys and values read in place from
    their pages. Page ids are trusted, as by the Triton kernels: they come from the block manager."""
    lib = _load()
    assert lib is not None, "the CPU decode kernels are not available here; check supports_attention() first"
    assert supports_attention(q, kv_cache), "fp32 or bf16 CPU operands alike, a contiguous pool and d % 8 == 0"
    B, hq, d = q.shape
    _, two, ps, hkv, d_kv = kv_cache.shape
    assert two == 2 and d_kv == d and hq % hkv == 0, f"q {tuple(q.shape)} does not fit the pool {tuple(kv_cache.shape)}"
    assert page_table.dtype == seq_lens.dtype == torch.int32 and page_table.shape[0] == seq_lens.shape[0] == B
    if page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    seq_lens, q = seq_lens.contiguous(), q.contiguous()
    out = torch.empty_like(q)  # (B, H_q, d)
    rc = lib.kl_paged_decode(q.data_ptr(), kv_cache.data_ptr(), page_table.data_ptr(), page_table.stride(0),
                             seq_lens.data_ptr(), out.data_ptr(), B, hq, hkv, d, ps, float(scale),
                             int(q.dtype == torch.bfloat16))
    if rc != 0:
        raise MemoryError("CPU decode attention: no memory for the split-KV state")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (M, K), weight: (K,), both fp32 or both bf16 -> (M, K) in x's dtype. One thread: meant
    for the few rows of a decode step, where torch's per-op cost dominates."""
    lib = _load()
    assert lib is not None, "the CPU decode kernels are not available here; check available() first"
    M, K = x.shape
    assert x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16) and weight.shape == (K,)
    assert x.device.type == "cpu" and weight.is_contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(M, K, dtype=x.dtype)  # (M, K)
    lib.kl_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, K, x.stride(0), float(eps),
                    int(x.dtype == torch.bfloat16))
    return y
