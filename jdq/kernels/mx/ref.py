"""MX block-scaled GEMM, pure jnp reference: MXFP8 (E4M3) and MXINT8 operands, one E8M0 scale per 32 along K.

Operands are OCP MX (:mod:`jdq.formats.mx`): codes ``(rows, K)`` (E4M3 as ``float8_e4m3fn``,
MXINT8 as int8 with value ``code · 2^-6``) and one scale byte per row and block of 32 along K.
With ``P_g`` the product of the codes over block ``g`` (exact for MXINT8: int32; for E4M3 the 32
products have 8-bit significands and sum exactly in float32 unless their magnitudes span more than
about 2^16 — 0.17 % of the block sums of random operands round, measured by
``tests/kernels/test_tpu_mx.py``) and ``a_g``, ``b_g`` the row and column
block scales as float32 (``2^(byte - 127)``, times ``2^-6`` per MXINT8 operand)::

    y[m, n] = Σ_g (float32(P_g[m, n]) · a_g[m]) · b_g[n]   (in block order)  + bias[n]

The multiplications are by powers of two (exact) and the sum runs in block order, one rounding
per block: the kernels do the same, so they agree with it bit for bit whenever every ``P_g`` is
exact (always for MXINT8), and all equal the fake-quant product ``x̂ · ŵᵀ`` up to the float32
summation order. Scale byte 0 (``2^-127``) is taken as 0: it
only occurs for blocks whose values are below ``2^-118`` (E4M3) / ``2^-126`` (MXINT8).

**On Hopper** (no block-scaled MMA; Blackwell's ``tcgen05`` has one): each block is one 8-bit
WGMMA (K = 32) into a fresh accumulator, converted and added, times the outer product of the two
scale vectors, into a float32 register carry. The carry update touches the whole accumulator tile
every 32 K (the MMA itself takes about as long), and for MXINT8 adds an int32→float32 conversion
per element: this path is correct and memory-lean (8.25 bits per element) but not faster than
bf16 (``jdq/kernels/NOTES.md``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

#: jdq format name -> (code dtype, extra power of two of the element)
FORMATS = {"mxfp8_e4m3": (jnp.float8_e4m3fn, 0), "mxint8": (jnp.int8, -6)}
BLOCK = 32


def check_format(fmt: str) -> str:
    """``fmt`` if it has an MX kernel, else a ValueError listing those that do."""
    if fmt not in FORMATS:
        raise ValueError(f"MX GEMM: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return fmt


def block_scales(scale_bytes, fmt: str):
    """E8M0 bytes (…, G) -> float32 multipliers (``2^(byte-127)``, MXINT8 also ``2^-6``; byte 0 -> 0, 255 -> inf)."""
    e = jnp.asarray(scale_bytes).astype(jnp.int32)
    s = lax.bitcast_convert_type(e << 23, jnp.float32)
    extra = FORMATS[check_format(fmt)][1]
    return s * jnp.float32(2.0**extra) if extra else s


def quantize_operand(x, fmt: str):
    """MX-quantize ``x`` (R, K) along K: codes (R, K) and float32 block scales transposed (K/32, R)."""
    from jdq import formats

    qt = formats.quantize(x, fmt, axis=-1)
    codes = qt.codes if fmt == "mxint8" else lax.bitcast_convert_type(qt.codes, jnp.float8_e4m3fn)
    return codes, block_scales(qt.scale, fmt).T


def mx_matmul(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16):
    """Reference MX GEMM: ``xq`` (M, K), ``wq`` (N, K) codes; ``xs`` (K/32, M), ``ws`` (K/32, N) float32 block scales."""
    m, k = xq.shape
    n = wq.shape[0]
    g = k // BLOCK
    if k % BLOCK or wq.shape[1] != k or xs.shape != (g, m) or ws.shape != (g, n):
        raise ValueError(f"MX GEMM: xq {xq.shape}, wq {wq.shape}, xs {xs.shape}, ws {ws.shape} do not fit blocks of {BLOCK}")
    acc = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    p = lax.dot_general(xq.reshape(m, g, BLOCK), wq.reshape(n, g, BLOCK), (((2,), (2,)), ((1,), (1,))),
                        preferred_element_type=acc, precision=lax.Precision.HIGHEST)  # (G, M, N)

    def step(carry, i):
        return carry + (p[i].astype(jnp.float32) * xs[i][:, None]) * ws[i][None, :], None

    y, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), jnp.arange(g))
    if b is not None:
        y = y + jnp.asarray(b, jnp.float32)[None, :]
    return y.astype(out_dtype)


def mx_linear(x, wq, ws, fmt: str, b=None, out_dtype=None):
    """Reference MX linear: quantize ``x`` (…, K) to ``fmt`` along K, then :func:`mx_matmul`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    xq, xs = quantize_operand(x.reshape(-1, x.shape[-1]), fmt)
    return mx_matmul(xq, xs, wq, ws, b, out_dtype).reshape(*lead, wq.shape[0])


__all__ = ["BLOCK", "FORMATS", "block_scales", "check_format", "mx_linear", "mx_matmul", "quantize_operand"]
