"""Weight-only W8A16 / W4A16 GEMM, pure jnp reference, and the packed int4 layout the kernels read.

``y = x · Ŵᵀ + b`` with ``x`` (M, K) in bf16/f32 and ``Ŵ[n, k] = code[n, k] * scale[n, k // g]``:
symmetric integer codes (int8: [-127, 127], int4: [-7, 7]), one float32 scale per output channel
and group of ``g`` consecutive input features (``g = K``: per channel). The reference dequantizes
in float32 and multiplies in float32 (``Precision.HIGHEST``).

**Packed int4 layout** (``pack_int4``): codes (N, K) with ``K % 128 == 0`` become int8 (N, K/2).
Within each block of 128 input features, byte ``j`` (0 ≤ j < 64) holds feature ``j`` in its low
nibble and feature ``j + 64`` in its high nibble (two's complement). A kernel unpacks a 128-wide
K tile with two arithmetic shifts into its two contiguous halves, no interleaving. (This differs
from :func:`jdq.formats.pack_bits`, which pairs neighbours ``2j``/``2j+1``; the layout is the
kernel's and is produced only by :func:`jdq.kernels.lower`.)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

PACK_BLOCK = 128


def pack_int4(codes):
    """Pack int4 codes (N, K) (values in [-8, 7], any int dtype) into int8 (N, K/2), module layout."""
    n, k = codes.shape
    if k % PACK_BLOCK:
        raise ValueError(f"pack_int4: K={k} must be a multiple of {PACK_BLOCK}")
    c = codes.astype(jnp.int32).reshape(n, k // PACK_BLOCK, 2, PACK_BLOCK // 2)
    lo, hi = c[:, :, 0, :], c[:, :, 1, :]
    byte = (lo & 0xF) | ((hi & 0xF) << 4)
    byte = jnp.where(byte >= 128, byte - 256, byte)
    return byte.astype(jnp.int8).reshape(n, k // 2)


def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: int8 (N, K/2) -> int8 codes (N, K), sign-extended."""
    n, kh = packed.shape
    p = packed.reshape(n, kh // (PACK_BLOCK // 2), PACK_BLOCK // 2)
    lo = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
    hi = lax.shift_right_arithmetic(p, jnp.int8(4))
    return jnp.stack([lo, hi], axis=2).reshape(n, kh * 2)


def dequantize(codes, scale, bits: int, group_size: int):
    """Float32 weight (N, K) from codes ((N, K) int8, or packed (N, K/2) for ``bits=4``) and scales (N, G)."""
    q = unpack_int4(codes) if bits == 4 else codes
    n, k = q.shape
    scale = jnp.asarray(scale, jnp.float32).reshape(n, -1)
    if k % group_size or scale.shape[1] != k // group_size:
        raise ValueError(f"weight-only: K={k}, group_size={group_size} and scale shape {scale.shape} disagree")
    return q.astype(jnp.float32) * jnp.repeat(scale, group_size, axis=1)


def weight_only_matmul(x, codes, scale, b, bits: int, group_size: int, out_dtype=None):
    """Reference weight-only GEMM ``x (M, K) · Ŵᵀ (+ b)`` in float32, cast to ``out_dtype``."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w = dequantize(codes, scale, bits, group_size)
    y = jnp.matmul(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    if b is not None:
        y = y + jnp.asarray(b, jnp.float32)
    return y.astype(out_dtype)


__all__ = ["PACK_BLOCK", "pack_int4", "unpack_int4", "dequantize", "weight_only_matmul"]
