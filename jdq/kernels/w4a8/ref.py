"""W4A8 GEMM, pure jnp reference: int4 weights with group-wise scales × int8 per-token activations.

``y[m, n] = (Σ_g float32(P_g[m, n]) · s_w[n, g]) · s_x[m] + b[n]`` where ``P_g`` is the exact int32
product of the int8 activation codes and the int4 weight codes over group ``g`` (``group_size``
consecutive input features; ``G = 1``: one scale per output channel, then the formula is that of
:func:`jdq.kernels.w8a8.ref.w8a8_matmul`). The float32 sum over groups runs in group order, one
rounding per group, which is what the kernel does, so the two agree bit for bit whenever the
scale multiplications are exact (power-of-two scales) and to float32 rounding otherwise.

Weights are packed by :func:`jdq.kernels.weight_only.ref.pack_int4` (N, K/2); codes in [-7, 7].
Activations are quantized by :func:`jdq.kernels.token_quant.ref.quantize_rows` (``"int8"``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jdq.kernels.weight_only.ref import unpack_int4


def w4a8_matmul(xq, xs, wq_packed, ws, b=None, group_size: int | None = None, out_dtype=jnp.bfloat16):
    """Reference W4A8 GEMM on quantized operands: ``xq`` (M, K) int8, ``wq_packed`` (N, K/2), ``ws`` (N, G)."""
    codes = unpack_int4(wq_packed)
    n, k = codes.shape
    if xq.shape[1] != k:
        raise ValueError(f"w4a8: activation has K={xq.shape[1]}, the packed weight {wq_packed.shape} holds K={k}")
    ws = jnp.asarray(ws, jnp.float32).reshape(n, -1)
    g_count = ws.shape[1]
    gs = k if group_size is None else group_size
    if g_count * gs != k:
        raise ValueError(f"w4a8: {g_count} scale groups of {gs} do not cover K={k}")
    dims = (((1,), (1,)), ((), ()))
    if g_count == 1:
        acc = lax.dot_general(xq, codes, dims, preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * xs[:, None] * ws[:, 0][None, :]
    else:
        carry = None
        for g in range(g_count):  # group order: one float32 rounding per group
            sl = slice(g * gs, (g + 1) * gs)
            p = lax.dot_general(xq[:, sl], codes[:, sl], dims, preferred_element_type=jnp.int32)
            t = p.astype(jnp.float32) * ws[:, g][None, :]
            carry = t if carry is None else carry + t
        y = carry * xs[:, None]
    if b is not None:
        y = y + jnp.asarray(b, jnp.float32)[None, :]
    return y.astype(out_dtype)


def w4a8_linear(x, wq_packed, ws, b=None, group_size: int | None = None, out_dtype=None):
    """Reference W4A8 linear layer: quantize ``x`` (…, K) per token to int8, then :func:`w4a8_matmul`."""
    from jdq.kernels.token_quant.ref import quantize_rows

    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]), "int8")
    y = w4a8_matmul(xq, xs, wq_packed, ws, b, group_size, out_dtype)
    return y.reshape(*lead, wq_packed.shape[0])


__all__ = ["w4a8_matmul", "w4a8_linear"]
