"""W8A8 GEMM (int8 or FP8 E4M3 operands), pure jnp reference: the semantics every W8A8 kernel reproduces.

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

**FP8 E4M3** (``jnp.float8_e4m3fn`` codes on both sides, scales ``amax · float32(1/448)``, see
:mod:`jdq.kernels.token_quant.ref`): the same formula with a float32 accumulation of the exact
E4M3 products (``|acc|`` is then exact only while the partial sums fit 24 bits, so kernels and
this reference agree to float32 rounding; Hopper's FP8 tensor cores add fewer bits than float32
inside one WGMMA, see ``jdq/kernels/NOTES.md``).
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
    """``xq (M, K) · wq (N, K)ᵀ``: exact in int32 for int8 codes, float32 for FP8 E4M3 codes."""
    if xq.dtype != wq.dtype or xq.dtype not in (jnp.int8, jnp.float8_e4m3fn):
        raise TypeError(f"w8a8: operands must both be int8 or both float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    acc = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    return lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=acc,
                           precision=lax.Precision.HIGHEST)


def quantize_per_token_fp8(x):
    """Dynamic per-row FP8 E4M3 quantization of ``x`` (…, K): codes (float8_e4m3fn) and float32 scales."""
    from jdq.kernels.token_quant.ref import quantize_rows

    return quantize_rows(x, "fp8_e4m3")


def quantize_per_channel_fp8(w, axis: int = -1):
    """FP8 E4M3 quantization of ``w`` with one scale per slice along ``axis``: codes, float32 scales."""
    from jdq import formats

    qt = formats.quantize(w, "fp8_e4m3", axis=axis, granularity="row")
    codes = lax.bitcast_convert_type(qt.codes, jnp.float8_e4m3fn)
    return codes, jnp.squeeze(jnp.maximum(jnp.asarray(qt.scale, jnp.float32), MIN_SCALE), axis)


def epilogue(acc, xs, ws, b, out_dtype):
    """``float32(acc) * xs[:, None] * ws[None, :] (+ b)`` cast to ``out_dtype``."""
    y = acc.astype(jnp.float32) * xs[:, None] * ws[None, :]
    if b is not None:
        y = y + b.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def w8a8_matmul(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16):
    """Reference W8A8 GEMM on already-quantized operands: ``xq`` (M, K) int8, ``wq`` (N, K) int8."""
    return epilogue(int8_accumulate(xq, wq), xs, ws, b, out_dtype)


def gated_residual(y, residual, gate, out_dtype=None):
    """``residual + gate[r // (M/G)] · y`` for ``y`` (M, N), one ``gate`` row (G, N) per M/G rows.

    ``y`` is rounded to ``out_dtype`` first (the unfused path stores the linear's output), the sum is
    computed in float32 and rounded once: the fused residual epilogue of the W8A8 GPU kernel.
    """
    out_dtype = residual.dtype if out_dtype is None else out_dtype
    m, g = y.shape[0], gate.shape[0]
    if m % g:
        raise ValueError(f"gated_residual: {m} rows are not a whole number of {g} gate groups")
    gf = jnp.repeat(gate.astype(jnp.float32), m // g, axis=0)
    yf = y.astype(out_dtype).astype(jnp.float32)
    return (residual.astype(jnp.float32) + gf * yf).astype(out_dtype)


def split_columns(y, split: int):
    """``y`` (M, N) as a tuple of ``split`` column parts (M, N/split): the kernel's split output."""
    if y.shape[-1] % split:
        raise ValueError(f"split_columns: N={y.shape[-1]} is not divisible by split={split}")
    return tuple(jnp.split(y, split, axis=-1))


def w8a8_linear(x, wq, ws, b=None, out_dtype=None):
    """Reference W8A8 linear layer: quantize ``x`` (…, K) per token (int8 or E4M3 like ``wq``), then :func:`w8a8_matmul`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    quant = quantize_per_token if wq.dtype == jnp.int8 else quantize_per_token_fp8
    xq, xs = quant(x.reshape(-1, x.shape[-1]))
    y = w8a8_matmul(xq, xs, wq, ws, b, out_dtype)
    return y.reshape(*lead, wq.shape[0])


def fake_quant_linear(x, wq, ws, b=None, out_dtype=None):
    """The same layer computed the fake-quant way (dequantize both operands, float32 matmul)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xq, xs = (quantize_per_token if wq.dtype == jnp.int8 else quantize_per_token_fp8)(x)
    xd = xq.astype(jnp.float32) * xs[..., None]
    wd = wq.astype(jnp.float32) * ws[:, None]
    y = jnp.matmul(xd, wd.T, precision=lax.Precision.HIGHEST)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(out_dtype)


__all__ = ["gated_residual", "split_columns", "quantize_per_token", "quantize_per_channel", "quantize_per_token_fp8", "quantize_per_channel_fp8", "int8_accumulate", "epilogue", "w8a8_matmul", "w8a8_linear", "fake_quant_linear"]
del jax
