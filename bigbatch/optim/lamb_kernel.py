"""A fused single-threaded C kernel for LAMB on CPU, built on first use with the system C compiler.

Why C: an optimizer step is memory-bound. Torch's fused AdamW reads g, m, v, w and writes m, v, w
once. LAMB needs the norm of the whole update u before it may touch w, so with torch ops alone it
costs at least four more passes (u = λ·w, the Adam direction into u, the two norms, w -= lr·r·u),
about 1.6× fused AdamW on one thread. This kernel does, per tensor, one pass that updates m and v,
writes u into a small scratch buffer that stays in cache and sums ‖w‖² and ‖u‖² (in float64), then
one pass w -= lr·r·u: about the cost of fused AdamW (see benchmarks/optimizer_step.py). Why not
torch.compile of the step: on this CPU, with torch 2.13, inductor took 28 s (empty cache; 48 s on a
loaded machine) to compile a 74-tensor LAMB step, and the result ran 5.1x slower than fused AdamW
(27.4 vs 5.3 ms); this kernel builds in under a second.

It serves only what it can do exactly: float32/float64 dense contiguous CPU tensors (no DTensor or
other subclasses), local norms (the default ``norm_fn``; a sharded ``norm_fn`` needs the bucket
path), and one torch thread (it does not parallelise; with more threads torch's own kernels do).
Everything else, and any build failure, falls back to the torch code in :mod:`bigbatch.optim.lamb`,
with one warning. ``BIGBATCH_NATIVE_KERNELS=0`` turns it off.

The library is cached under ``$BIGBATCH_CACHE_DIR`` (default ``~/.cache/bigbatch``), named by a hash
of the source, the flags, the compiler and this CPU's feature flags (``-march=native``), so nodes
with different CPUs sharing a home directory never load each other's build.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

# One function per dtype; u is a scratch buffer of at least max(numel) elements. bc1, bc2: bias
# corrections per tensor (1 when off); clip <= 0: no trust clip; adapt 0: r = 1 (excluded groups).
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#define LAMB_STEP(NAME, T, SQRT)                                                              \
void NAME(int64_t n, T **w, T **g, T **m, T **v, const int64_t *numel, T *u,                 \
          double lr, double beta1, double beta2, double eps, double wd,                       \
          const double *bc1, const double *bc2, double clip, int adapt) {                     \
    const T one_minus_b1 = (T)(1.0 - beta1), b2 = (T)beta2, one_minus_b2 = (T)(1.0 - beta2); \
    const T e = (T)eps, lambda = (T)wd;                                                       \
    for (int64_t t = 0; t < n; t++) {                                                         \
        T *W = w[t], *G = g[t], *M = m[t], *V = v[t];                                         \
        const int64_t k = numel[t];                                                           \
        const T inv_bc1 = (T)(1.0 / bc1[t]), sqrt_bc2 = (T)sqrt(bc2[t]);                     \
        double w_sq = 0.0, u_sq = 0.0;                                                        \
        _Pragma("omp simd reduction(+:w_sq,u_sq)")                                            \
        for (int64_t i = 0; i < k; i++) {                                                     \
            const T gi = G[i], wi = W[i];                                                     \
            const T mi = M[i] + one_minus_b1 * (gi - M[i]);                                   \
            const T vi = b2 * V[i] + one_minus_b2 * gi * gi;                                  \
            const T ui = (mi * inv_bc1) / (SQRT(vi) / sqrt_bc2 + e) + lambda * wi;            \
            M[i] = mi; V[i] = vi; u[i] = ui;                                                  \
            w_sq += (double)(wi * wi); u_sq += (double)(ui * ui);                             \
        }                                                                                     \
        double r = 1.0;                                                                       \
        if (adapt && w_sq > 0.0 && u_sq > 0.0) {                                              \
            r = sqrt(w_sq) / sqrt(u_sq);                                                      \
            if (clip > 0.0 && r > clip) r = clip;                                             \
        }                                                                                     \
        const T a = (T)(-lr * r);                                                             \
        _Pragma("omp simd")                                                                   \
        for (int64_t i = 0; i < k; i++) W[i] += a * u[i];                                     \
    }                                                                                         \
}
LAMB_STEP(lamb_step_f32, float, sqrtf)
LAMB_STEP(lamb_step_f64, double, sqrt)
"""

# -fno-math-errno lets sqrt vectorise (results are IEEE either way); `omp simd` allows reordering
# the two sums only; no -ffast-math, so the update itself rounds like the torch ops it replaces.
_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC"]
_ARCH_FLAGS = ["-march=native"]
_DTYPES = {torch.float32: "lamb_step_f32", torch.float64: "lamb_step_f64"}

_library: Optional[ctypes.CDLL] = None
_tried = False
_enabled = os.environ.get("BIGBATCH_NATIVE_KERNELS", "1") != "0"


def set_enabled(flag: bool) -> None:
    """Use the native kernel when possible (True) or always the torch code (False)."""
    global _enabled
    _enabled = flag


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str, flags: list[str]) -> Path:
    root = Path(os.environ.get("BIGBATCH_CACHE_DIR") or Path.home() / ".cache" / "bigbatch")
    key = "\n".join([_SOURCE, " ".join(flags), compiler, platform.machine(), _cpu_signature()])
    return root / "native" / f"lamb_kernel-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file and rename it into place, so ranks building at once never load
    a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "lamb_kernel.c", Path(tmp) / target.name
        src.write_text(_SOURCE)
        subprocess.run([compiler, *flags, "-o", str(out), str(src)], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, target)


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    errors = []
    for flags in (_FLAGS + _ARCH_FLAGS, _FLAGS):  # some compilers lack -march=native
        target = _library_path(compiler, flags)
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            errors.append(f"{exc} {stderr.decode(errors='replace')[-300:]}".strip())
    else:
        raise OSError("; ".join(errors))
    pointer, double = ctypes.c_void_p, ctypes.c_double
    for name in _DTYPES.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int64] + [pointer] * 6 + [double] * 5 + [pointer, pointer, double, ctypes.c_int]
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on the first call; None if disabled or unbuildable."""
    global _library, _tried
    if not _enabled:
        return None
    if not _tried:
        _tried = True
        try:
            _library = _load()
        except OSError as exc:
            warnings.warn(f"LAMB: native CPU kernel unavailable ({exc}); using the torch implementation",
                          RuntimeWarning, stacklevel=3)
    return _library


def supports(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is a plain dense contiguous CPU float32/float64 tensor of one dtype."""
    dtype = tensors[0].dtype
    return (dtype in _DTYPES and torch.get_num_threads() == 1
            and all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                    and t.dtype == dtype and t.is_contiguous() for t in tensors))


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _doubles(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)


def lamb_step(lib: ctypes.CDLL, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_sqs: list[Tensor], scratch: Tensor, *, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float, corrections: list[tuple[float, float]],
              trust_clip: Optional[float], adapt: bool) -> None:
    """One LAMB step over tensors that passed `supports`; `scratch` holds max(numel) elements."""
    fn = getattr(lib, _DTYPES[params[0].dtype])
    numel = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
    fn(len(params), _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
       numel, scratch.data_ptr(), float(lr), float(betas[0]), float(betas[1]), float(eps),
       float(weight_decay), _doubles([c[0] for c in corrections]), _doubles([c[1] for c in corrections]),
       float(trust_clip) if trust_clip is not None else -1.0, int(adapt))
    # Writes through raw pointers bypass autograd's version counters; bump them as an in-place op would.
    torch.autograd.graph.increment_version(params + exp_avgs + exp_avg_sqs)
