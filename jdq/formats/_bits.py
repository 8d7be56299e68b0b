"""Exact float32 bit tricks, element rounding and blocking shared by every format.

Everything here is elementwise jnp (plus reshapes), so XLA fuses a whole cast into one pass.
Exponents are read from the float32 bit pattern with ``lax.bitcast_convert_type`` (exact, unlike
``log2``), and powers of two are built from bits, so scaling by ``2**n`` is exact.

Platform note: XLA flushes float32 subnormals to zero in arithmetic on CPU and GPU (inputs and
results below ``2**-126`` act as zero). Bit casts and conversions are not affected. The formats
inherit this: an input or a dequantized output with magnitude below ``2**-126`` becomes ``0``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

ROUNDINGS = ("even", "away")
F32_EXP_MASK = 0x7F800000
F32_ABS_MASK = 0x7FFFFFFF


def check_rounding(rounding):
    """Validate a rounding option ('even' = round-half-to-even, 'away' = ties away from zero)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def round_half(v, rounding):
    """Round to the nearest integer, ties to even ('even') or away from zero ('away')."""
    method = lax.RoundingMethod.TO_NEAREST_EVEN if rounding == "even" else lax.RoundingMethod.AWAY_FROM_ZERO
    return lax.round(v, method)


def f32_bits(x):
    """The int32 bit pattern of a float32 array."""
    return lax.bitcast_convert_type(x, jnp.int32)


def abs_bits(x):
    """Bit pattern of |x|; as int32 it orders like |x| (NaN > Inf > finite), subnormals included."""
    return f32_bits(x) & F32_ABS_MASK


def exponent(x):
    """Unbiased float32 exponent field: floor(log2|x|) for normal x, -127 for zero/subnormal, 128 for Inf/NaN."""
    return ((f32_bits(x) >> 23) & 0xFF) - 127


def pow2(n):
    """Exact float32 ``2**n`` for int32 ``n`` in [-126, 127] (built from bits)."""
    n = jnp.asarray(n, jnp.int32)
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def mul_pow2(x, n):
    """``x * 2**n`` for int32 ``n`` in [-252, 252], as two exact power-of-two multiplies."""
    half = n >> 1
    return x * pow2(half) * pow2(n - half)


def round_to_float_grid(v, ebits, mbits, max_norm, rounding):
    """Round float32 ``v`` to the grid of a 1-sign, ``ebits``-exponent, ``mbits``-mantissa float.

    Subnormals of the small format are kept (the exponent is clamped below at
    ``emin = 2 - 2**(ebits-1)``), and the result saturates at ``±max_norm`` (Inf too).
    NaN stays NaN. Arithmetic, not ``astype(float8_*)``: compiled for a GPU, XLA drops a
    float32 → float8 → float32 round trip (``benchmarks/float8_convert_check.py``).
    """
    emin = 2 - 2 ** (ebits - 1)
    if rounding == "even":
        return _round_to_float_grid_even(v, emin, mbits, max_norm)
    return _round_to_float_grid_scaled(v, emin, mbits, max_norm, rounding)


def _round_to_float_grid_scaled(v, emin, mbits, max_norm, rounding):
    """:func:`round_to_float_grid` by scaling each value's grid step to 1, rounding, and scaling back."""
    e = jnp.clip(exponent(v), emin, 127)
    shift = mbits - e  # |v| * 2**shift < 2**(mbits + 1): the grid step becomes 1
    q = mul_pow2(round_half(mul_pow2(v, shift), rounding), -shift)
    return jnp.clip(q, -max_norm, max_norm)


def _round_to_float_grid_even(v, emin, mbits, max_norm):
    """:func:`round_to_float_grid` with ties to even, by the float32 adder's own rounding.

    For ``|v| < 2**(e+1)`` with the grid step ``2**(e - mbits)`` (``e`` the exponent, clamped at
    ``emin``), ``c = 2**(e - mbits + 23)`` has that step as its ulp, so ``(|v| + c) - c`` is ``|v|``
    rounded half-to-even to the grid, the subtraction exact. No per-element power-of-two multiplies
    (the scale-round-unscale form has four); the same value for every input (tests: every bf16
    value and random float32 against a float64 definition and ml_dtypes; on a device,
    ``benchmarks/float8_convert_check.py``).
    """
    a = jnp.minimum(jnp.abs(v), np.float32(2 * max_norm))  # beyond 2·max saturates anyway; Inf stays finite
    e = jnp.clip(exponent(a), emin, 127 - 23 + mbits)  # NaN: the clip keeps c finite, the sum stays NaN
    c = pow2(e - mbits + 23)
    q = jnp.minimum((a + c) - c, np.float32(max_norm))
    sign = f32_bits(v) & np.int32(-(2**31))
    return lax.bitcast_convert_type(f32_bits(q) | sign, jnp.float32)


def encode_float(q, ebits, mbits):
    """Bit code (sign | biased exponent | mantissa) of values ``q`` already on the small-float grid."""
    emin = 2 - 2 ** (ebits - 1)
    mag = jnp.abs(q)
    e = jnp.clip(exponent(mag), emin, 127)
    # normal: ((e - emin + 1) << m) + frac;  subnormal (e clamped to emin): |q| / 2**(emin - m)
    significand = mul_pow2(mag, mbits - e).astype(jnp.int32)  # in [0, 2**(m+1))
    code = ((e - emin) << mbits) + significand
    sign = (f32_bits(q) >> 31) & 1
    return ((sign << (ebits + mbits)) | code).astype(jnp.uint8)


def decode_float(code, ebits, mbits):
    """Float32 value of small-float bit codes (inverse of :func:`encode_float`)."""
    emin = 2 - 2 ** (ebits - 1)
    code = code.astype(jnp.int32)
    field = (code >> mbits) & ((1 << ebits) - 1)
    frac = code & ((1 << mbits) - 1)
    significand = frac + jnp.where(field > 0, 1 << mbits, 0)
    mag = mul_pow2(significand.astype(jnp.float32), jnp.maximum(field, 1) - 1 + emin - mbits)
    sign = (code >> (ebits + mbits)) & 1
    return jnp.where(sign == 1, -mag, mag)


def unrolled_max(a, axis, size):
    """Max over a small axis as elementwise maxima of slices, keepdims.

    Written without a reduce so XLA fuses it into the elementwise pass instead of materialising
    a per-sub-block (or per-block) array.
    """
    parts = [lax.slice_in_dim(a, i, i + 1, axis=axis) for i in range(size)]
    out = parts[0]
    for p in parts[1:]:
        out = jnp.maximum(out, p)
    return out


def bf16_word_halves(x, words_per_block):
    """A bf16 array's last axis as 32-bit words of two elements, grouped in blocks: the halves as float32.

    Returns (lo, hi), each ``shape[:-1] + (n_blocks, words_per_block)``: the even and the odd
    elements. A bf16 value is the upper half of its float32, so the halves come by shifts and masks
    (exact), and the words need no 16-bit intermediates — which XLA would otherwise materialise.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    w = lax.bitcast_convert_type(x.reshape(*lead, n // 2, 2), jnp.uint32).reshape(*lead, -1, words_per_block)
    return (lax.bitcast_convert_type(w << 16, jnp.float32),
            lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32))


def bf16_from_word_halves(lo, hi, shape):
    """Inverse of :func:`bf16_word_halves` for float32 halves that are bf16 values (at most 8 significant bits).

    Such a float32's lower 16 bits are zero, so its upper half is its bf16 value: packing by shifts
    equals ``astype(bfloat16)`` (NaN, Inf and zeros included).
    """
    words = (lax.bitcast_convert_type(lo, jnp.uint32) >> 16) | (lax.bitcast_convert_type(hi, jnp.uint32) & jnp.uint32(0xFFFF0000))
    return lax.bitcast_convert_type(words.reshape(*shape[:-1], shape[-1] // 2), jnp.bfloat16).reshape(shape)


def normalize_axis(axis, ndim, what="axis"):
    """A non-negative axis index, or a ValueError naming the axis and the rank."""
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError(f"{what}={axis} needs an array with at least one dimension, got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim


def to_blocks(x, axis, block):
    """Split ``axis`` into (n_blocks, block), zero-padding the axis up to a multiple of ``block``.

    Returns an array of shape ``shape[:axis] + (n_blocks, block) + shape[axis+1:]``; zeros do not
    change a block's max |x|, so padding never changes a block's scale.
    """
    n = x.shape[axis]
    pad = (-n) % block
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    return x.reshape(x.shape[:axis] + ((n + pad) // block, block) + x.shape[axis + 1 :])


def from_blocks(xb, axis, n):
    """Inverse of :func:`to_blocks`: merge (n_blocks, block) back into ``axis`` and drop padding."""
    x = xb.reshape(xb.shape[:axis] + (xb.shape[axis] * xb.shape[axis + 1],) + xb.shape[axis + 2 :])
    if x.shape[axis] != n:
        x = lax.slice_in_dim(x, 0, n, axis=axis)
    return x


def check_float_input(x, name="x"):
    """Return ``x`` as a jnp array, raising TypeError for integer, bool or complex dtypes."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a real floating dtype (float32, bfloat16, float16), got {x.dtype}")
    return x
