"""Shared-microexponent formats MX9, MX6, MX4 (Rouhani et al., ISCA 2023; "SMX" in later papers).

Two-level block floating point along ``axis`` (the contraction axis):

* a block of ``block_size`` (k1, default 16) elements shares an 8-bit exponent ``E``;
* each sub-block of ``sub_block_size`` (k2, default 2) elements shares a 1-bit micro-exponent
  ``s`` in {0, 1};
* each element is a sign and an ``m``-bit magnitude ``|q| <= 2**m - 1`` (m = 7, 4, 2 for MX9,
  MX6, MX4), decoding to ``q * 2**(E - s - (m - 1))``.

Storage: ``(m + 1) + 8 / k1 + 1 / k2`` bits per element = 9, 6, 4 with the defaults.

The default rules are those of AMD Quark's emulation (``fake_quantize_mx6_mx9``, docs/methods.md §1.2):

1. ``|x| < 2**-126`` is flushed to +0 (float32 subnormals).
2. ``E = floor(log2(max |x|))`` over the block, read from the float32 exponent field
   (``shared_exponent='floor'``). ``shared_exponent='rounded'`` instead bumps ``E`` by one when
   the block max would round past ``2**m - 1`` (so the largest element never saturates).
3. ``s = 1`` iff every element of the sub-block has ``floor(log2|x|) < E``, decided from the
   exponents **before** rounding (``microexponent='exponent'``); so a shifted pair can saturate
   (MX4: 0.9995 -> 0.75 in a block with max 1). ``microexponent='fit'`` shifts a sub-block iff
   all its elements still fit in ``m`` bits after rounding at the finer step (never saturates
   because of the shift).
4. ``q = clamp(round(x / step), -(2**m - 1), 2**m - 1)``, round-half-to-even by default
   (``rounding='away'``: ties away from zero), saturating; the exponent is never bumped.
5. An axis not divisible by ``block_size`` is zero-padded (zeros never change ``E`` and count as
   "below E" for the micro-exponent).

Non-finite input (our choice; not storable otherwise): a block containing NaN or ±Inf decodes to
all NaN (its exponent byte is 0xFF, like OCP E8M0's NaN). Quark instead passes NaN/Inf through
unchanged and quantizes the block's other elements as if they were 0.

Speed: with k2 = 2 (the default) :func:`fake_quantize` uses one-pass formulations of the same
arithmetic that XLA fuses (one loop along the last axis of a bf16/f16 array; elsewhere a block-max
reduction plus one elementwise pass), bit-exact with the general blocked path that
:func:`quantize` uses; ``benchmarks/results/formats_device.md`` has their GPU bandwidth.

Exponent byte: ``E + 127`` (1..254), 0 for a block that is all zero after flushing, 0xFF for NaN.
Element codes are sign-magnitude: ``code = (sign << m) | |q|`` (uint8).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _bits
from ._registry import FormatKind, register

NAMES = {"mx9": 7, "mx6": 4, "mx4": 2}
SHARED_EXPONENTS = ("floor", "rounded")
MICROEXPONENTS = ("exponent", "fit")
NAN_EXPONENT = 255


@dataclasses.dataclass(frozen=True)
class SMXFormat:
    """A shared-microexponent format.

    Fields: ``name`` (``'mx9' | 'mx6' | 'mx4'``), ``mantissa_bits`` (m: 7, 4, 2),
    ``block_size`` (k1, default 16), ``sub_block_size`` (k2, default 2, must divide k1),
    ``rounding`` (``'even'`` | ``'away'``), ``shared_exponent`` (``'floor'`` | ``'rounded'``),
    ``microexponent`` (``'exponent'`` | ``'fit'``).
    """

    name: str
    mantissa_bits: int
    block_size: int = 16
    sub_block_size: int = 2
    rounding: str = "even"
    shared_exponent: str = "floor"
    microexponent: str = "exponent"

    kind = "smx"
    options = ("block_size", "sub_block_size", "rounding", "shared_exponent", "microexponent")

    def __post_init__(self):
        for field in ("block_size", "sub_block_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{field} must be a positive int, got {v!r}")
        if self.block_size % self.sub_block_size:
            raise ValueError(
                f"sub_block_size={self.sub_block_size} must divide block_size={self.block_size}"
            )
        if not 1 <= self.mantissa_bits <= 7:
            raise ValueError(f"mantissa_bits must be in [1, 7], got {self.mantissa_bits!r}")
        _bits.check_rounding(self.rounding)
        if self.shared_exponent not in SHARED_EXPONENTS:
            raise ValueError(f"shared_exponent must be one of {SHARED_EXPONENTS}, got {self.shared_exponent!r}")
        if self.microexponent not in MICROEXPONENTS:
            raise ValueError(f"microexponent must be one of {MICROEXPONENTS}, got {self.microexponent!r}")

    @property
    def element_bits(self) -> int:
        """Bits of one element code (sign + magnitude)."""
        return self.mantissa_bits + 1

    @property
    def bits_per_element(self) -> float:
        """Average storage bits: element + 8-bit exponent / k1 + 1-bit micro-exponent / k2."""
        return self.element_bits + 8 / self.block_size + 1 / self.sub_block_size

    @property
    def qmax(self) -> int:
        """Largest magnitude code, ``2**m - 1``."""
        return 2**self.mantissa_bits - 1


def _layout(x, fmt, axis):
    """``x`` as shape[:axis] + (n_blocks, n_sub, k2) + shape[axis+1:] (zero-padded)."""
    xb = _bits.to_blocks(x, axis, fmt.block_size)
    k2 = fmt.sub_block_size
    return xb.reshape(xb.shape[: axis + 1] + (fmt.block_size // k2, k2) + xb.shape[axis + 2 :])


def _unlayout(xs, axis, n):
    xb = xs.reshape(xs.shape[: axis + 1] + (xs.shape[axis + 1] * xs.shape[axis + 2],) + xs.shape[axis + 3 :])
    return _bits.from_blocks(xb, axis, n)


def _qmax(m):
    """Largest magnitude code ``2**m - 1`` of mantissa width ``m`` (an int, or an int32 array: float32)."""
    if isinstance(m, (int, np.integer)):
        return 2 ** int(m) - 1
    return (jnp.left_shift(jnp.int32(1), m) - 1).astype(jnp.float32)


def _block_exponent(amax_bits, fmt, m):
    """(NaN/Inf flag, E, E clamped for arithmetic) of blocks from their max |x| bit pattern.

    The max |x| bit pattern orders like |x| (NaN > Inf > finite), so one reduction gives both the
    NaN/Inf flag and ``E = floor(log2 max|x|)`` (-127 when all |x| < 2**-126). ``m``: the mantissa
    width (an int, or an int32 array broadcasting against the blocks: one width per element).
    """
    bad = amax_bits >= _bits.F32_EXP_MASK
    e_blk = (amax_bits >> 23) - 127
    if fmt.shared_exponent == "rounded":
        amax = lax.bitcast_convert_type(amax_bits, jnp.float32)
        top = _bits.round_half(_bits.mul_pow2(amax, (m - 1) - jnp.maximum(e_blk, -126)), fmt.rounding)
        e_blk = jnp.minimum(e_blk + (top > _qmax(m)).astype(jnp.int32), 127)
    return bad, e_blk, jnp.maximum(e_blk, -126)


def _fits_finer(v, e_calc, fmt, m):
    """|v| rounded at the micro-shifted (finer) step, for ``microexponent='fit'``."""
    return jnp.abs(_bits.round_half(_bits.mul_pow2(v, (m - 1) - (e_calc - 1)), fmt.rounding))


def _codes(v, step, fmt, m):
    """Integer-valued float32 codes ``clamp(round(v / 2**step), ±qmax)``."""
    qmax = _qmax(m)
    return jnp.clip(_bits.round_half(_bits.mul_pow2(v, -step), fmt.rounding), -qmax, qmax)


def _flush(v, ab):
    """Float32 subnormals and zeros flushed to +0."""
    return jnp.where(ab < 0x00800000, 0.0, v)


def _quantize_blocks(x, fmt, axis):
    """Integer-valued float32 codes q, step exponents, block exponents E, micro bits, NaN mask."""
    m, k2 = fmt.mantissa_bits, fmt.sub_block_size
    xs = _layout(x.astype(jnp.float32), fmt, axis)
    sub_axis, k2_axis = axis + 1, axis + 2
    ab = _bits.abs_bits(xs)
    bad, e_blk, e_calc = _block_exponent(jnp.max(ab, axis=(sub_axis, k2_axis), keepdims=True), fmt, m)
    xs = _flush(xs, ab)
    if fmt.microexponent == "exponent":
        # a flushed element has exponent field 0 (-127), which is what its bits give anyway
        shift = ((_bits.unrolled_max(ab, k2_axis, k2) >> 23) - 127 < e_blk).astype(jnp.int32)
    else:
        shift = (_bits.unrolled_max(_fits_finer(xs, e_calc, fmt, m), k2_axis, k2) <= fmt.qmax).astype(jnp.int32)
    step = e_calc - shift - (m - 1)
    return _codes(xs, step, fmt, m), step, e_blk, shift, bad


def _micro_shift(ab, ab_partner, v, v_partner, e_blk, e_calc, fmt, m):
    """The 1-bit micro-exponent of each element's pair, elementwise from the element and its partner."""
    if fmt.microexponent == "exponent":
        # a flushed element has exponent field 0 (-127), which is what its bits give anyway
        return ((jnp.maximum(ab, ab_partner) >> 23) - 127 < e_blk).astype(jnp.int32)
    fine = jnp.maximum(_fits_finer(v, e_calc, fmt, m), _fits_finer(v_partner, e_calc, fmt, m))
    return (fine <= _qmax(m)).astype(jnp.int32)


def _fake_quantize_words(x, fmt: SMXFormat, widths=None):
    """:func:`fake_quantize` along the last axis of a 16-bit float array (k2 = 2): one fused pass.

    A sub-block is then one 32-bit word (a bit cast, no data movement), so its max and
    micro-exponent are elementwise on the word's halves, and the block max is an unrolled max over
    the block's words, which share a cache line. XLA fuses the whole cast into a single loop.
    ``widths``: ``None`` (every element ``fmt.mantissa_bits``) or x-shaped int32 mantissa widths
    (:func:`fake_quantize_select`).
    """
    k1, nsub = fmt.block_size, fmt.block_size // 2
    lead, n = x.shape[:-1], x.shape[-1]
    bf16 = x.dtype == jnp.bfloat16
    if bf16:
        lo, hi = _bits.bf16_word_halves(x, nsub)
    else:
        w = lax.bitcast_convert_type(x.reshape(*lead, n // 2, 2), jnp.uint32).reshape(*lead, n // k1, nsub)
        lo, hi = (lax.bitcast_convert_type(h.astype(jnp.uint16), x.dtype).astype(jnp.float32) for h in (w & 0xFFFF, w >> 16))
    ab_lo, ab_hi = _bits.abs_bits(lo), _bits.abs_bits(hi)
    amax_bits = _bits.unrolled_max(jnp.maximum(ab_lo, ab_hi), x.ndim, nsub)
    lo, hi = _flush(lo, ab_lo), _flush(hi, ab_hi)

    def bad_and_step(m):
        bad, e_blk, e_calc = _block_exponent(amax_bits, fmt, m)
        return bad, e_calc - _micro_shift(ab_lo, ab_hi, lo, hi, e_blk, e_calc, fmt, m) - (m - 1)

    def cast_half(v, m, bad, step):
        return jnp.where(bad, jnp.nan, _bits.mul_pow2(_codes(v, step, fmt, m), step))

    def word_half(v):
        return lax.bitcast_convert_type(v.astype(x.dtype), jnp.uint16).astype(jnp.uint32)

    if widths is None:  # one width: the pair's step is shared by its halves
        m_lo = m_hi = fmt.mantissa_bits
        at_lo = at_hi = bad_and_step(m_lo)
    else:
        pair = widths.reshape(*lead, n // 2, 2)
        m_lo, m_hi = (pair[..., i].reshape(*lead, n // k1, nsub) for i in (0, 1))
        at_lo, at_hi = bad_and_step(m_lo), bad_and_step(m_hi)
    out_lo, out_hi = cast_half(lo, m_lo, *at_lo), cast_half(hi, m_hi, *at_hi)
    if bf16:  # codes of at most 7 + 1 significant bits: the results are bf16 values
        return _bits.bf16_from_word_halves(out_lo, out_hi, x.shape)
    words = word_half(out_lo) | (word_half(out_hi) << 16)
    return lax.bitcast_convert_type(words.reshape(*lead, n // 2), x.dtype).reshape(x.shape)


def _fake_quantize_partner(x, fmt: SMXFormat, axis: int, widths=None):
    """:func:`fake_quantize` for k2 = 2 along any axis: a block-max reduction and one elementwise pass.

    Each element reads its pair partner from the pair-reversed array (``lax.rev``, fused by XLA),
    so the micro-exponent needs no per-sub-block intermediate; the general path materialises one
    and reads the input three times. ``widths`` as in :func:`_fake_quantize_words`.
    """
    m = fmt.mantissa_bits if widths is None else _bits.to_blocks(widths, axis, fmt.block_size)
    xb = _bits.to_blocks(x.astype(jnp.float32), axis, fmt.block_size)
    pairs = xb.shape[: axis + 1] + (fmt.block_size // 2, 2) + xb.shape[axis + 2 :]
    partner = lax.rev(xb.reshape(pairs), (axis + 2,)).reshape(xb.shape)
    amax_bits = jnp.max(_bits.abs_bits(xb), axis=axis + 1, keepdims=True)
    out = _cast_with_partner(xb, partner, amax_bits, fmt, m)
    return _bits.from_blocks(out, axis, x.shape[axis]).astype(x.dtype)


def _cast_with_partner(v, partner, amax_bits, fmt, m):
    """Fake-quantized float32 ``v`` from its pair partner and its block's max |x| bits: elementwise."""
    ab, ab_partner = _bits.abs_bits(v), _bits.abs_bits(partner)
    bad, e_blk, e_calc = _block_exponent(amax_bits, fmt, m)
    v = _flush(v, ab)
    shift = _micro_shift(ab, ab_partner, v, _flush(partner, ab_partner), e_blk, e_calc, fmt, m)
    step = e_calc - shift - (m - 1)
    return jnp.where(bad, jnp.nan, _bits.mul_pow2(_codes(v, step, fmt, m), step))


def fake_quantize_given_amax(v, partner, amax_bits, fmt: SMXFormat, mantissa_bits=None):
    """Fake-quantized float32 ``v`` given its sub-block partner and its block's max |x| bit pattern.

    Elementwise (k2 = 2 only: ``partner`` is the other element of each pair, ``amax_bits`` the
    int32 bits of the block's max |x|, both of v's shape): what :func:`fake_quantize` computes once
    the block maxima are known, for a caller that reduces the blocks itself (a kernel).
    ``mantissa_bits``: ``None`` (``fmt``'s) or int32 widths of v's shape, as
    :func:`fake_quantize_select` uses them for formats that :func:`differ_only_in_width`.
    """
    if fmt.sub_block_size != 2:
        raise ValueError(f"fake_quantize_given_amax: sub_block_size must be 2, {fmt.name} has {fmt.sub_block_size}")
    m = fmt.mantissa_bits if mantissa_bits is None else mantissa_bits
    return _cast_with_partner(v.astype(jnp.float32), partner.astype(jnp.float32), amax_bits, fmt, m)


def _one_pass(x, fmt: SMXFormat, axis: int, widths=None):
    """The k2 = 2 one-pass cast (words along a 16-bit last axis, else the partner form); None for other k2."""
    if fmt.sub_block_size != 2:
        return None
    words = jnp.dtype(x.dtype).itemsize == 2 and axis == x.ndim - 1 and x.shape[axis] % fmt.block_size == 0
    if words and fmt.block_size <= 32:  # the block max is unrolled over block_size / 2 words
        return _fake_quantize_words(x, fmt, widths)
    return _fake_quantize_partner(x, fmt, axis, widths)


def fake_quantize(x, fmt: SMXFormat, axis: int):
    """Quantize-dequantize ``x`` along normalised ``axis``; same shape and dtype."""
    out = _one_pass(x, fmt, axis)  # the default k2 = 2: faster formulations of the same arithmetic
    if out is not None:
        return out
    q, step, _, _, bad = _quantize_blocks(x, fmt, axis)
    out = jnp.where(bad, jnp.nan, _bits.mul_pow2(q, step))
    return _unlayout(out, axis, x.shape[axis]).astype(x.dtype)


def differ_only_in_width(a: SMXFormat, b: SMXFormat) -> bool:
    """Whether two SMX specs agree on everything but the name and the mantissa width."""
    return dataclasses.replace(a, name=b.name, mantissa_bits=b.mantissa_bits) == b


def fake_quantize_select(x, select, hi: SMXFormat, lo: SMXFormat, axis: int):
    """``where(select, fake_quantize(x, hi), fake_quantize(x, lo))`` elementwise, in one pass where it can.

    ``select``: a boolean array of x's shape. When ``hi`` and ``lo`` differ only in their mantissa
    width (MX9 / MX6 / MX4 with the same options) and k2 = 2, one cast runs with a per-element
    width: an element's block exponent and micro-exponent depend on its block and pair and on the
    width only (``'rounded'`` / ``'fit'``), so this is the two casts' values bit for bit, whatever
    ``select`` is. Otherwise both casts run and are selected.
    """
    if differ_only_in_width(hi, lo):
        widths = jnp.where(select, jnp.int32(hi.mantissa_bits), jnp.int32(lo.mantissa_bits))
        out = _one_pass(x, hi, axis, widths)
        if out is not None:
            return out
    return jnp.where(select, fake_quantize(x, hi, axis), fake_quantize(x, lo, axis))


def quantize(x, fmt: SMXFormat, axis: int):
    """Sign-magnitude codes (uint8, x's shape), exponent bytes (uint8) and micro-exponent bits (uint8).

    Exponent bytes have x's shape with ``axis`` -> ``ceil(n / k1)``; micro bits have ``axis`` ->
    ``ceil(n / k1) * k1 / k2``.
    """
    q, _, e_blk, shift, bad = _quantize_blocks(x, fmt, axis)
    m = fmt.mantissa_bits
    qi = q.astype(jnp.int32)
    codes = jnp.where(qi < 0, (1 << m) | -qi, qi).astype(jnp.uint8)
    exp_byte = jnp.where(bad, NAN_EXPONENT, jnp.maximum(e_blk + 127, 0)).astype(jnp.uint8)
    exp_byte = exp_byte.reshape(exp_byte.shape[: axis + 1] + exp_byte.shape[axis + 3 :])
    micro = shift.astype(jnp.uint8)
    micro = micro.reshape(micro.shape[:axis] + (micro.shape[axis] * micro.shape[axis + 1],) + micro.shape[axis + 3 :])
    return _unlayout(codes, axis, x.shape[axis]), exp_byte, micro


def dequantize(codes, exp_byte, micro, fmt: SMXFormat, axis: int, dtype):
    """Values from codes, exponent bytes and micro-exponent bits (inverse of :func:`quantize`)."""
    m = fmt.mantissa_bits
    n = codes.shape[axis]
    cs = _layout(codes.astype(jnp.int32), fmt, axis)
    q = (cs & fmt.qmax).astype(jnp.float32)
    q = jnp.where((cs >> m) & 1 == 1, -q, q)
    nsub = fmt.block_size // fmt.sub_block_size
    e = exp_byte.astype(jnp.int32)
    e = e.reshape(e.shape[: axis + 1] + (1, 1) + e.shape[axis + 1 :])
    s = micro.astype(jnp.int32)
    s = s.reshape(s.shape[:axis] + (s.shape[axis] // nsub, nsub, 1) + s.shape[axis + 1 :])
    step = jnp.maximum(e - 127, -126) - s - (m - 1)
    out = jnp.where(e == NAN_EXPONENT, jnp.nan, _bits.mul_pow2(q, step))
    return _unlayout(out, axis, n).astype(dtype)


def _quantize_fields(x, spec, axis, scale, zero):
    codes, exp_byte, micro = quantize(x, spec, axis)
    return codes, exp_byte, None, micro


register(FormatKind(
    kind="smx", spec_type=SMXFormat, names=lambda: tuple(NAMES),
    from_name=lambda name: SMXFormat(name, NAMES[name]) if name in NAMES else None,
    fake=lambda x, spec, axis, scale, zero: fake_quantize(x, spec, axis),
    quantize=_quantize_fields,
    dequantize=lambda codes, scale, zero, micro, spec, axis, dtype: dequantize(codes, scale, micro, spec, axis, dtype),
))
