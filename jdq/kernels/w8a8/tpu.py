"""W8A8 GEMM as a Pallas TPU kernel: int8 (MXU int8 × int8 -> int32) or FP8 E4M3 (-> float32), fused dequant epilogue.

Grid (M/tm, N/tn, K/tk), K innermost ("arbitrary"); a VMEM accumulator (int32 for int8 codes,
float32 for E4M3 codes) is zeroed at the first K step and, at the last, multiplied by the row and
column scales, biased and cast. The weight arrives K-major (N, K) as for the GPU kernel; the dot
contracts the last dims of both tiles. Tested in Pallas TPU interpret mode on CPU (no TPU was
available to time it); block sizes default to 256 (MXU-friendly on v5e/v6e), shrunk to the shape
when smaller.

**FP8 E4M3** (``float8_e4m3fn`` on both sides, :mod:`jdq.kernels.w8a8.ref`'s FP8 semantics): by
default each E4M3 tile is upcast to bf16 in the kernel before the dot. That is exact (every E4M3
value is a bf16 value) and so is each product (two 4-bit significands), and it is what TPUs
before TPU7x need: ``pltpu.TpuInfo.is_matmul_supported`` (jax 0.10.2) lists float8_e4m3fn
operands as native only on generations 7 and 8; generations 5 and 6 (v5e, v5p, v6e) take bf16,
float32, ``float8_e5m2``, ``float8_e4m3b11fnuz``, int8 × int8 and int4 × int4, generation 4 no
8-bit float. (It lists no int8 × int8 on generations 7 and 8, so there the int8 path is not
native either.) ``fp8_native=True`` feeds the E4M3 tiles to the dot as they are (for TPU7x; the
same values). Only the float32 summation order differs from the reference (per K tile on the MXU,
then tile after tile), so the result equals :func:`jdq.kernels.w8a8.ref.w8a8_matmul` bit for bit
whenever every partial sum is exact in float32 (e.g. small-integer codes), and otherwise to
float32 summation rounding (``|Δacc| ≤ 2·K·2⁻²⁴·Σ|x_q·w_q|``).

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


def _kernel(xq_ref, wq_ref, xs_ref, ws_ref, b_ref, o_ref, acc_ref, *, k_steps, dot_dtype):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, w = xq_ref[...], wq_ref[...]
    if dot_dtype is not None:
        x, w = x.astype(dot_dtype), w.astype(dot_dtype)
    acc_ref[...] += lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_ref.dtype)

    @pl.when(kk == k_steps - 1)
    def _():
        y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...] + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


# jitted like the GPU kernels: identical calls in a model lower once.
@functools.partial(jax.jit, static_argnames=("out_dtype", "tm", "tn", "tk", "interpret", "fp8_native"))
def w8a8_matmul_tpu(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16, tm=256, tn=256, tk=512, interpret=False,
                    fp8_native=False):
    """W8A8 GEMM ``(M, K) × (N, K) -> (M, N)`` on TPU, codes both int8 or both float8_e4m3fn; shapes must tile."""
    if xq.dtype != wq.dtype or xq.dtype not in (jnp.int8, jnp.float8_e4m3fn):
        raise TypeError(f"w8a8 TPU kernel: xq and wq must both be int8 or both float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape != (n, k):
        raise ValueError(f"w8a8 TPU kernel: xq {xq.shape} and wq {wq.shape} disagree on K")
    tm, tn, tk = min(tm, m), min(tn, n), min(tk, k)
    if m % tm or n % tn or k % tk:
        raise ValueError(f"w8a8 TPU kernel: M={m} N={n} K={k} do not tile by ({tm}, {tn}, {tk})")
    is_int = xq.dtype == jnp.int8
    acc_dtype = jnp.int32 if is_int else jnp.float32
    dot_dtype = None if is_int or fp8_native else jnp.bfloat16
    b = jnp.zeros((n,), jnp.float32) if b is None else b
    xs2 = jnp.asarray(xs, jnp.float32).reshape(m, 1)
    ws2 = jnp.asarray(ws, jnp.float32).reshape(1, n)
    b2 = jnp.asarray(b, jnp.float32).reshape(1, n)
    k_steps = k // tk
    return tiled_gemm_call(
        functools.partial(_kernel, k_steps=k_steps, dot_dtype=dot_dtype), m, n, tm, tn, k_steps,
        [
            pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
            pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
        ],
        [pltpu.VMEM((tm, tn), acc_dtype)], out_dtype, interpret,
    )(xq, wq, xs2, ws2, b2)


__all__ = ["w8a8_matmul_tpu"]
