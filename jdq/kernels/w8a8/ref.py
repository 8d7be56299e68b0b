"""W8A8 int8 GEMM, pure jnp reference: the semantics every W8A8 kernel must reproduce.

``y = (x_q · w_qᵀ) * s_x[:, None] * s_w[None, :] + b`` where

* ``w_q`` is int8 ``(N, K)`` (K-major: the layout Hopper's 8-bit WGMMA needs for its B operand),
  one float32 scale ``s_w`` per output channel, symmetric (codes in ``[-127, 127]``);
* ``x_q`` is int8 ``(M, K)`` with one float32 scale ``s_x`` per token (row), computed from the
  activation itself (dynamic) by :func:`quantize_per_token`;
* the product is accumulated exactly in int32 (``|acc| <= 127² K``, exact for ``K < 2^17``) and
  the epilogue is ``float32(acc) * s_x * s_w + b`` (in that order: two roundings), then cast to the
  output dtype.

Quantization *is* :func:`jdq.formats.quantize` (``int8``, symmetric, granularity ``'row'``,
dynamic, round-half-even; at the time of writing ``s = amax·float32(1/127)``, codes
``clip(round(x·(1/s)), ±127)`` in float32), with the applied scale ``max(s, 2^-126)``: the
lowered path and the fake-quant path see the same codes and scales bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

QMAX = 127
MIN_SCALE = 2.0**-126


def _int8_rows(x, axis):
    from jdq import formats

    qt = formats.quantize(x, "int8", axis=axis, granularity="row")
    return qt.codes, jnp.squeeze(jnp.maximum(jnp.asarray(qt.scale, jnp.float32), MIN_SCALE), axis)


def quantize_per_token(x):
    """Dynamic symmetric per-row int8 quantization of ``x`` (…, K): codes (…, K) and float32 scales (…,)."""
    return _int8_rows(x, -1)


def quantize_per_channel(w, axis: int = -1):
    """Symmetric int8 quantization of ``w`` with one scale per slice along ``axis``: codes, float32 scales."""
    return _int8_rows(w, axis)


def int8_accumulate(xq, wq):
    """Exact ``xq (M, K) · wq (N, K)ᵀ`` in int32."""
    return lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def epilogue(acc, xs, ws, b, out_dtype):
    """``float32(acc) * xs[:, None] * ws[None, :] (+ b)`` cast to ``out_dtype``."""
    y = acc.astype(jnp.float32) * xs[:, None] * ws[None, :]
    if b is not None:
        y = y + b.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def w8a8_matmul(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16):
    """Reference W8A8 GEMM on already-quantized operands: ``xq`` (M, K) int8, ``wq`` (N, K) int8."""
    return epilogue(int8_accumulate(xq, wq), xs, ws, b, out_dtype)


def w8a8_linear(x, wq, ws, b=None, out_dtype=None):
    """Reference W8A8 linear layer: quantize ``x`` (…, K) per token, then :func:`w8a8_matmul`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    xq, xs = quantize_per_token(x.reshape(-1, x.shape[-1]))
    y = w8a8_matmul(xq, xs, wq, ws, b, out_dtype)
    return y.reshape(*lead, wq.shape[0])


def fake_quant_linear(x, wq, ws, b=None, out_dtype=None):
    """The same layer computed the fake-quant way (dequantize both operands, float32 matmul)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xq, xs = quantize_per_token(x)
    xd = xq.astype(jnp.float32) * xs[..., None]
    wd = wq.astype(jnp.float32) * ws[:, None]
    y = jnp.matmul(xd, wd.T, precision=lax.Precision.HIGHEST)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(out_dtype)


__all__ = ["quantize_per_token", "quantize_per_channel", "int8_accumulate", "epilogue", "w8a8_matmul", "w8a8_linear", "fake_quant_linear"]
del jax
