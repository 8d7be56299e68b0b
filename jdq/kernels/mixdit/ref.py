"""MixDiT mixed-precision GEMM, pure jnp reference, and how MX9 / MX6 operands map onto tensor cores.

The plan (``jdq.recipes`` ``mixdit`` with channel-granularity outliers): the activation's input
channels are permuted so that the ``k_hi`` outlier channels come first
(:func:`jdq.quant.outliers.channel_permutation`); those are cast to **MX9** and the rest to
**MX6** (:mod:`jdq.formats.smx`: blocks of 16 along K with a shared 8-bit exponent, pairs with a
1-bit micro-exponent); the weight's input channels are permuted the same way and cast to MX6
(:func:`jdq.quant.outliers.outlier_weight`). Because ``k_hi`` is a multiple of 16, the two parts
are whole blocks and ``y = x̂_hi · ŵ_hiᵀ + x̂_lo · ŵ_loᵀ`` is exactly the fake-quant product.

**Mapping onto Hopper tensor cores** (why not int8). An SMX value is ``q · 2^(E − s − (m−1))``
(``|q| ≤ 2^m − 1``). Folding the micro-exponent into an integer code gives ``c = q · 2^(1−s)``:
MX6 ``|c| ≤ 30`` fits int8 but MX9 ``|c| ≤ 254`` does not, and the shared exponent changes every
16 elements along K while an int8 (or FP8) WGMMA contracts 32 elements per instruction, so an
int8 path needs one rescaled partial product per 16-block: an int32→float conversion and an FMA
of the whole accumulator tile every 16 K, several times the cost of the MMA itself (NOTES.md).
Instead:

* **MX6 part → FP8 E4M3, exactly.** ``c`` has at most 4 significant bits, the width of an E4M3
  significand, so ``x̂_lo = e · 2^(R − 7)`` with ``R = floor(log2 max|x̂_lo|)`` of the row (weight:
  of the output channel) and ``e`` an E4M3 value: shared and micro-exponents become E4M3's own
  exponent, and one power-of-two scale per row (per channel) is applied in the epilogue. This is
  exact whenever every nonzero block of the row lies within 12 binades of the row's largest
  (E4M3 subnormals reach ``2^-9``); a block further down is rounded to the E4M3 grid (this
  reference does the same rounding, so kernel and reference always agree; :func:`lo_is_exact`
  tells whether they also equal the fake-quant values). The product runs on FP8 WGMMA (2× bf16).
* **MX9 part → bf16, exactly.** 7-bit magnitudes do not fit E4M3; bf16 holds them (8-bit
  significand, float32 exponent range), so ``x̂_hi`` and ``ŵ_hi`` are the dequantized values in
  bf16 and run on bf16 WGMMA (the part is small: about 5 % of K).

Both accumulate in float32 in one kernel: ``y = acc_hi + acc_lo · s_x[m] · s_w[n] + b``. The two
K ranges are zero-padded to the kernel's K tiles (64 for bf16, 128 for E4M3); zeros add nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

HI_TILE = 64  # K tile of the bf16 (MX9) part
LO_TILE = 128  # K tile of the E4M3 (MX6) part
E4M3_TOP = 7  # codes are scaled so that the largest magnitude is in [128, 256)


def _pad_cols(a, multiple):
    pad = (-a.shape[-1]) % multiple
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]) if pad else a


def _row_exponent(v):
    """floor(log2 max|v|) of each row (float32 exponent field), at least -119."""
    amax = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=-1)
    e = ((lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF) - 127
    return jnp.maximum(e, -126 + E4M3_TOP)


def _pow2(e):
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def to_e4m3_rows(v):
    """MX6 values ``v`` (R, C) -> E4M3 codes (R, C) and power-of-two float32 row scales (R,)."""
    e = _row_exponent(v)
    codes = (v.astype(jnp.float32) * _pow2(E4M3_TOP - e)[:, None]).astype(jnp.float8_e4m3fn)
    return codes, _pow2(e - E4M3_TOP)


def lo_is_exact(v):
    """Per row: whether the E4M3 re-encoding of the MX6 values ``v`` (R, C) is exact."""
    codes, s = to_e4m3_rows(v)
    return jnp.all(codes.astype(jnp.float32) * s[:, None] == v.astype(jnp.float32), axis=-1)


def quantize_activation(x, perm, k_hi: int, hi="mx9", lo="mx6"):
    """The activation operands of the kernel from ``x`` (M, K): (x_hi bf16, x_lo E4M3, s_x float32).

    ``perm`` is the kernel's channel order (outliers first), ``k_hi`` the number of outlier
    channels (a multiple of the block size). ``x_hi`` (M, K_hi padded to 64) holds the MX9 values
    of the outlier channels, ``x_lo`` (M, K_lo padded to 128) the MX6 values of the rest re-encoded
    by :func:`to_e4m3_rows` with row scales ``s_x`` (M,).
    """
    from jdq import formats

    # float32, not x's dtype: the same values (MX9/MX6 codes are exact in bf16), but on the H200 the
    # bf16 word formulation after the gather made the fc2 split 19 % slower (kernels runs 5-6)
    xp = jnp.take(x, perm, axis=-1).astype(jnp.float32)
    # a part with no channels (no outliers, or all of them) has nothing to cast: formats.cast refuses
    # an empty axis
    x_hi = (formats.cast(xp[:, :k_hi], hi, axis=-1) if k_hi else xp[:, :0]).astype(jnp.bfloat16)
    v_lo = formats.cast(xp[:, k_hi:], lo, axis=-1) if k_hi < xp.shape[-1] else xp[:, k_hi:]
    x_lo, s_x = to_e4m3_rows(v_lo)
    return _pad_cols(x_hi, HI_TILE), _pad_cols(x_lo, LO_TILE), s_x


def pack_weight(w, perm, k_hi: int, fmt="mx6"):
    """Kernel weights from ``w`` (K, N): (w_hi (N, K_hi pad) bf16, w_lo (N, K_lo pad) E4M3, s_w (N,), ŵ (K, N)).

    ``ŵ`` is the dequantized weight in the original channel order (what the kernel multiplies
    by), for the exactness check of :func:`jdq.kernels.lower`.
    """
    from jdq import formats

    wp = jnp.take(jnp.asarray(w, jnp.float32), perm, axis=0)
    v = formats.cast(wp, fmt, axis=0)  # (K, N) in kernel order, blocks along K
    w_hi = v[:k_hi].T.astype(jnp.bfloat16)
    w_lo, s_w = to_e4m3_rows(v[k_hi:].T)
    deq_p = jnp.concatenate([w_hi.astype(jnp.float32), w_lo.astype(jnp.float32) * s_w[:, None]], axis=1).T
    deq = jnp.take(deq_p, jnp.argsort(perm), axis=0)
    return _pad_cols(w_hi, HI_TILE), _pad_cols(w_lo, LO_TILE), s_w, deq


def mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b=None, out_dtype=jnp.bfloat16):
    """Reference mixed GEMM: ``x_hi·w_hiᵀ + (x_lo·w_loᵀ) · s_x[:, None] · s_w[None, :] + b`` (float32 accumulation)."""
    dims = (((1,), (1,)), ((), ()))
    acc_lo = lax.dot_general(x_lo, w_lo, dims, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    y = acc_lo * s_x[:, None] * s_w[None, :]
    if x_hi.shape[1]:
        acc_hi = lax.dot_general(x_hi, w_hi, dims, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        y = acc_hi + y
    if b is not None:
        y = y + jnp.asarray(b, jnp.float32)[None, :]
    return y.astype(out_dtype)


def mixdit_linear(x, perm, k_hi, w_hi, w_lo, s_w, b=None, out_dtype=None):
    """Reference MixDiT linear: quantize ``x`` (…, K) (:func:`quantize_activation`), then :func:`mixdit_matmul`."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x_hi, x_lo, s_x = quantize_activation(x.reshape(-1, x.shape[-1]), perm, k_hi)
    y = mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, out_dtype)
    return y.reshape(*lead, w_lo.shape[0])


__all__ = ["HI_TILE", "LO_TILE", "lo_is_exact", "mixdit_linear", "mixdit_matmul", "pack_weight",
           "quantize_activation", "to_e4m3_rows"]
