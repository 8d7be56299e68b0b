"""MixDiT mixed-precision GEMM as a Pallas TPU kernel: bf16 dots on the outlier (MX9) channels, E4M3 on the rest (MX6).

Computes :func:`jdq.kernels.mixdit.ref.mixdit_matmul` (that module says why MX9 maps onto bf16 and
MX6 onto E4M3 with power-of-two row scales, exactly) on the operands of
:func:`jdq.kernels.mixdit.gpu.mixdit_matmul_gpu`: ``x_hi`` (M, K_hi) and ``w_hi`` (N, K_hi) bf16,
``x_lo`` (M, K_lo) and ``w_lo`` (N, K_lo) float8_e4m3fn (weights K-major), ``s_x`` (M,), ``s_w``
(N,) float32. One kernel, grid (M/tm, N/tn, K_hi/tk_hi + K_lo/tk_lo), K innermost ("arbitrary"):
the first K_hi/tk_hi steps accumulate ``x_hi·w_hiᵀ`` into one float32 VMEM accumulator, the
remaining steps ``x_lo·w_loᵀ`` into a second (each operand's block index is clamped during the
other part's steps, so it is not fetched again); the last step computes
``acc_hi + acc_lo · s_x · s_w + b`` (the reference's order), casts and stores. ``tk_hi`` defaults
to all of K_hi (the outlier part is a few percent of K: one step); with K_hi = 0 the hi operands
are not passed to the kernel at all.

**Equality.** Every product is exact in float32 (bf16 × bf16: 8-bit significands; E4M3 × E4M3:
4-bit) and the scales are powers of two, so kernel and reference differ only in the float32
summation order within each part: bit-exact whenever the partial sums are exact in float32 (e.g.
small integers), otherwise within ``2·K·2⁻²⁴·Σ|terms|`` of each other.

E4M3 tiles are upcast to bf16 before the dot (exact; needed before TPU7x, see
:mod:`jdq.kernels.w8a8.tpu`); ``fp8_native=True`` gives the dot the E4M3 tiles. Tested in Pallas
TPU interpret mode on CPU only (no TPU was available to time it).

Tiles on a TPU: the Pallas TPU lowering wants the last two dims of every block to be multiples of
(8, 128) or the whole array (tm % 8, tn % 128, tk % 128 unless equal to M, N, K; 8-bit tiles are
(32, 128), so tm % 32 avoids padding); interpret mode does not check this, the tests cross-lower
one DiT-XL/2 shape to a Mosaic TPU custom call (JAX's side of the compile only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdq.kernels._tpu import tiled_gemm_call

_DIMS = (((1,), (1,)), ((), ()))


def _kernel(*refs, hi_steps, lo_steps, lo_dot_dtype, has_bias):
    refs = list(refs)
    xh_ref, wh_ref = (refs.pop(0), refs.pop(0)) if hi_steps else (None, None)
    xl_ref, wl_ref, sx_ref, sw_ref = refs[:4]
    b_ref = refs[4] if has_bias else None
    o_ref, acc_lo_ref, *acc_hi = refs[4 + has_bias:]
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_lo_ref[...] = jnp.zeros_like(acc_lo_ref)
        if hi_steps:
            acc_hi[0][...] = jnp.zeros_like(acc_hi[0])

    if hi_steps:
        @pl.when(kk < hi_steps)
        def _():
            acc_hi[0][...] += lax.dot_general(xh_ref[...], wh_ref[...], _DIMS, preferred_element_type=jnp.float32)

    @pl.when(kk >= hi_steps)
    def _():
        x, w = xl_ref[...], wl_ref[...]
        if lo_dot_dtype is not None:
            x, w = x.astype(lo_dot_dtype), w.astype(lo_dot_dtype)
        acc_lo_ref[...] += lax.dot_general(x, w, _DIMS, preferred_element_type=jnp.float32)

    @pl.when(kk == hi_steps + lo_steps - 1)
    def _():
        y = acc_lo_ref[...] * sx_ref[...] * sw_ref[...]
        if hi_steps:
            y = acc_hi[0][...] + y
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm", "tn", "tk_lo", "tk_hi", "interpret", "fp8_native"))
def mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b=None, out_dtype=jnp.bfloat16, tm=256, tn=256, tk_lo=512,
                      tk_hi=None, interpret=False, fp8_native=False):
    """``x_hi·w_hiᵀ + (x_lo·w_loᵀ)·s_x·s_w + b`` on TPU, bf16 hi and E4M3 lo operands (see the module docstring)."""
    m, k_lo = x_lo.shape
    n = w_lo.shape[0]
    k_hi = x_hi.shape[1]
    if x_lo.dtype != jnp.float8_e4m3fn or w_lo.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"mixdit TPU kernel: x_lo and w_lo must be float8_e4m3fn, got {x_lo.dtype}, {w_lo.dtype}")
    if x_hi.dtype != jnp.bfloat16 or w_hi.dtype != jnp.bfloat16:
        raise TypeError(f"mixdit TPU kernel: x_hi and w_hi must be bfloat16, got {x_hi.dtype}, {w_hi.dtype}")
    if w_lo.shape != (n, k_lo) or w_hi.shape != (n, k_hi) or x_hi.shape[0] != m or k_lo == 0:
        raise ValueError(f"mixdit TPU kernel: shapes x_hi {x_hi.shape}, x_lo {x_lo.shape}, w_hi {w_hi.shape}, "
                         f"w_lo {w_lo.shape} disagree (or K_lo is 0)")
    if s_x.shape != (m,) or s_w.shape != (n,):
        raise ValueError(f"mixdit TPU kernel: scales s_x {s_x.shape}, s_w {s_w.shape}; want ({m},), ({n},)")
    tm, tn, tk_lo = min(tm, m), min(tn, n), min(tk_lo, k_lo)
    tk_hi = k_hi if tk_hi is None else min(tk_hi, k_hi)
    if m % tm or n % tn or k_lo % tk_lo or (k_hi and k_hi % tk_hi):
        raise ValueError(f"mixdit TPU kernel: M={m} N={n} K_hi={k_hi} K_lo={k_lo} do not tile by "
                         f"(tm={tm}, tn={tn}, tk_hi={tk_hi}, tk_lo={tk_lo})")
    hi_steps = k_hi // tk_hi if k_hi else 0
    lo_steps = k_lo // tk_lo
    in_specs, args = [], []
    if hi_steps:
        last = hi_steps - 1
        in_specs += [pl.BlockSpec((tm, tk_hi), lambda i, j, kk: (i, jnp.minimum(kk, last))),
                     pl.BlockSpec((tn, tk_hi), lambda i, j, kk: (j, jnp.minimum(kk, last)))]
        args += [x_hi, w_hi]
    in_specs += [pl.BlockSpec((tm, tk_lo), lambda i, j, kk: (i, jnp.maximum(kk - hi_steps, 0))),
                 pl.BlockSpec((tn, tk_lo), lambda i, j, kk: (j, jnp.maximum(kk - hi_steps, 0))),
                 pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)),
                 pl.BlockSpec((1, tn), lambda i, j, kk: (0, j))]
    args += [x_lo, w_lo, jnp.asarray(s_x, jnp.float32).reshape(m, 1), jnp.asarray(s_w, jnp.float32).reshape(1, n)]
    if b is not None:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(jnp.asarray(b, jnp.float32).reshape(1, n))
    kernel = functools.partial(_kernel, hi_steps=hi_steps, lo_steps=lo_steps,
                               lo_dot_dtype=None if fp8_native else jnp.bfloat16, has_bias=b is not None)
    scratch = [pltpu.VMEM((tm, tn), jnp.float32)] * (2 if hi_steps else 1)
    return tiled_gemm_call(kernel, m, n, tm, tn, hi_steps + lo_steps, in_specs, scratch, out_dtype, interpret)(*args)


__all__ = ["mixdit_matmul_tpu"]
