"""MX block-scaled GEMM as a Pallas TPU kernel: one depth-32 dot per MX block, rescaled into a float32 accumulator.

Computes :func:`jdq.kernels.mx.ref.mx_matmul` for MXFP8 (E4M3 codes, float32 block products) and
MXINT8 (int8 codes, exact int32 block products). Grid (M/tm, N/tn, K/tk), K innermost
("arbitrary"), ``tk`` a multiple of 32; per K step and per MX block ``g`` of the tile, in block
order: ``P_g = x_g · w_gᵀ`` on the MXU, then ``acc += (float32(P_g) · a_g[m]) · b_g[n]`` into a
float32 VMEM accumulator; the last K step adds the bias and casts. Operands as for the GPU kernel:
codes ``xq`` (M, K), ``wq`` (N, K) (K-major), float32 block scales ``xs`` (K/32, M), ``ws``
(K/32, N) (:func:`jdq.kernels.mx.ref.block_scales`). The wrapper views them (no copy) as
``(K/32, M, 1)`` and ``(K/32, 1, N)`` so that the kernel reads a row's scale as a (tm, 1) column
and a channel's as a (1, tn) row, with no transpose in the kernel.

**Equality.** The scale multiplications are by powers of two (exact unless they leave float32's
normal range) and the accumulator adds the blocks in the reference's order, one rounding each, so
the result equals the reference bit for bit whenever each ``P_g`` is the same float32 number in
both: always for MXINT8 (int32, exact), and for MXFP8 whenever the 32 exact E4M3 products of a
block sum exactly in float32 (their bits span at most 24); otherwise ``P_g`` may differ by the
float32 rounding of a 32-term sum (``|ΔP_g| ≤ 31·2⁻²⁴·Σ|products|``).

E4M3 tiles are upcast to bf16 before the dot (exact; needed before TPU7x, see
:mod:`jdq.kernels.w8a8.tpu`); ``fp8_native=True`` gives the dot the E4M3 tiles. Tested in Pallas
TPU interpret mode on CPU only. On a TPU the depth-32 dots fill a quarter (128-deep MXU, v5e) or
an eighth (256-deep, v6e/TPU7x) of the systolic array, and the accumulator is read and written
per K step (not timed: no TPU was available).

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

from jdq.kernels.mx.ref import BLOCK


def _kernel(xq_ref, wq_ref, xs_ref, ws_ref, *rest, k_steps, blocks, acc_dtype, dot_dtype, has_bias):
    b_ref, o_ref, acc_ref = rest if has_bias else (None, *rest)
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for g in range(blocks):  # block order, as in the reference's scan
        x = xq_ref[:, g * BLOCK:(g + 1) * BLOCK]
        w = wq_ref[:, g * BLOCK:(g + 1) * BLOCK]
        if dot_dtype is not None:
            x, w = x.astype(dot_dtype), w.astype(dot_dtype)
        p = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype).astype(jnp.float32)
        acc = acc + (p * xs_ref[g]) * ws_ref[g]  # (tm, tn) · (tm, 1) · (1, tn)
    acc_ref[...] = acc

    @pl.when(kk == k_steps - 1)
    def _():
        y = acc_ref[...]
        if has_bias:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm", "tn", "tk", "interpret", "fp8_native"))
def mx_matmul_tpu(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16, tm=256, tn=256, tk=512, interpret=False,
                  fp8_native=False):
    """MX GEMM ``(M, K) × (N, K) -> (M, N)`` on TPU with float32 block scales ``xs`` (K/32, M), ``ws`` (K/32, N)."""
    if xq.dtype != wq.dtype or xq.dtype not in (jnp.int8, jnp.float8_e4m3fn):
        raise TypeError(f"MX TPU kernel: codes must both be int8 or both float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    m, k = xq.shape
    n = wq.shape[0]
    g = k // BLOCK
    if k % BLOCK or wq.shape != (n, k) or xs.shape != (g, m) or ws.shape != (g, n):
        raise ValueError(f"MX TPU kernel: xq {xq.shape}, wq {wq.shape}, xs {xs.shape}, ws {ws.shape} disagree "
                         f"(want wq (N, K), xs (K/{BLOCK}, M), ws (K/{BLOCK}, N), K a multiple of {BLOCK})")
    tm, tn, tk = min(tm, m), min(tn, n), min(tk, k)
    if m % tm or n % tn or k % tk or tk % BLOCK:
        raise ValueError(f"MX TPU kernel: M={m} N={n} K={k} do not tile by ({tm}, {tn}, {tk}) "
                         f"(tk must also be a multiple of {BLOCK})")
    is_int = xq.dtype == jnp.int8
    has_bias = b is not None
    blocks, k_steps = tk // BLOCK, k // tk
    in_specs = [
        pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
        pl.BlockSpec((blocks, tm, 1), lambda i, j, kk: (kk, i, 0)),
        pl.BlockSpec((blocks, 1, tn), lambda i, j, kk: (kk, 0, j)),
    ]
    args = [xq, wq, jnp.asarray(xs, jnp.float32).reshape(g, m, 1), jnp.asarray(ws, jnp.float32).reshape(g, 1, n)]
    if has_bias:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        args.append(jnp.asarray(b, jnp.float32).reshape(1, n))
    kernel = functools.partial(_kernel, k_steps=k_steps, blocks=blocks, acc_dtype=jnp.int32 if is_int else jnp.float32,
                               dot_dtype=None if is_int or fp8_native else jnp.bfloat16, has_bias=has_bias)
    return tiled_gemm_call(kernel, m, n, tm, tn, k_steps, in_specs, [pltpu.VMEM((tm, tn), jnp.float32)], out_dtype,
                           interpret)(*args)


__all__ = ["mx_matmul_tpu"]
