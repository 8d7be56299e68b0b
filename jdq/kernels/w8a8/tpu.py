"""W8A8 int8 GEMM as a Pallas TPU kernel (MXU int8 × int8 -> int32), fused dequant epilogue.

Grid (M/tm, N/tn, K/tk), K innermost ("arbitrary"); an int32 VMEM accumulator is zeroed at the
first K step and, at the last, multiplied by the row and column scales, biased and cast. The
weight arrives K-major (N, K) as for the GPU kernel; the dot contracts the last dims of both
tiles. Tested in Pallas TPU interpret mode on CPU (no TPU was available to time it); block sizes
default to 256 (MXU-friendly on v5e/v6e), shrunk to the shape when smaller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(xq_ref, wq_ref, xs_ref, ws_ref, b_ref, o_ref, acc_ref, *, k_steps):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(xq_ref[...], wq_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    @pl.when(kk == k_steps - 1)
    def _():
        y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...] + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def w8a8_matmul_tpu(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16, tm=256, tn=256, tk=512, interpret=False):
    """W8A8 GEMM ``(M, K) int8 × (N, K) int8 -> (M, N)`` on TPU; shapes must tile (after shrinking)."""
    m, k = xq.shape
    n = wq.shape[0]
    tm, tn, tk = min(tm, m), min(tn, n), min(tk, k)
    if m % tm or n % tn or k % tk:
        raise ValueError(f"w8a8 TPU kernel: M={m} N={n} K={k} do not tile by ({tm}, {tn}, {tk})")
    b = jnp.zeros((n,), jnp.float32) if b is None else b
    xs2 = jnp.asarray(xs, jnp.float32).reshape(m, 1)
    ws2 = jnp.asarray(ws, jnp.float32).reshape(1, n)
    b2 = jnp.asarray(b, jnp.float32).reshape(1, n)
    k_steps = k // tk
    return pl.pallas_call(
        functools.partial(_kernel, k_steps=k_steps),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // tm, n // tn, k_steps),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
            pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(xq, wq, xs2, ws2, b2)


__all__ = ["w8a8_matmul_tpu"]
