"""OCP Microscaling (MX) v1.0 formats: MXFP8 (E4M3, E5M2), MXFP6 (E3M2, E2M3), MXFP4 (E2M1), MXINT8.

A block of ``block_size`` (default 32) consecutive elements along ``axis`` (the contraction axis)
shares one E8M0 scale ``X = 2**E``; each element stores ``P_i`` and decodes to ``X * P_i``.

What this module does, exactly:

* **Scale.** ``E = floor(log2(amax)) - emax_elem`` where ``amax`` is the block's max ``|x|`` and
  ``floor(log2 .)`` is read from the float32 exponent field (the OCP "largest power of two
  <= amax" rule). ``E`` is clamped to the E8M0 range ``[-127, 127]``. The stored scale byte is
  ``E + 127``; ``0xFF`` means NaN.
* **Elements.** ``P_i = round(x_i / X)`` onto the element grid: round-half-to-even by default
  (``rounding='away'``: ties away from zero), subnormals of the element format kept,
  **saturating** at ``±max_normal`` (no element Inf/NaN is ever produced). MXINT8 elements are
  sign-magnitude integers times ``2**-6``, clamped to ``±127/64`` (as in the microxcaling emulator;
  ``-2`` is never produced).
* **All-zero block.** ``amax = 0`` gives ``E = -127`` (scale byte 0) and all elements 0.
* **NaN.** A block containing NaN gets scale byte ``0xFF`` and decodes to all NaN (the spec: a NaN
  scale makes the whole block NaN; torchao does the same).
* **Inf.** ``amax = Inf`` is treated as ``floor(log2 amax) = 128`` (the exponent field of Inf, as
  torchao's FLOOR mode does): the Inf elements saturate to ``±max_normal`` times the block scale
  ``2**(128 - emax)``, which overflows float32, so ±Inf stays ±Inf; the finite elements of that
  block are quantized with that scale (0 unless huge; a huge one can round up to ±Inf). The
  stored codes are ``±max_normal``; nothing becomes NaN. MXINT8 (emax 0) is the exception: its
  scale clamps to ``2**127`` and Inf saturates to the finite ``±(127/64) * 2**127``.
* **Scale code 0.** The spec decodes byte 0 as ``2**-127`` and so do we, in both directions.
  torchao quantizes those blocks with ``2**-126`` but decodes with ``2**-127`` (off by 2x);
  ``tests/formats/test_formats_torchao.py::test_scale_code_zero_follows_spec`` pins the difference.
* **Padding.** An axis whose length is not a multiple of ``block_size`` is zero-padded to the next
  multiple (zeros do not change any block's amax) and the padding is dropped from the result.
* **float32 subnormals.** XLA flushes float32 subnormals (|x| < 2**-126) in arithmetic on CPU and
  GPU, so such inputs act as 0 and dequantized values below 2**-126 flush to 0 (torchao, running
  with subnormals, keeps them). Everything else is bit-exact with torchao's FLOOR mode.

Inputs of any float dtype are computed in float32 and returned in the input dtype (exact for
bfloat16/float32: every MX value has at most 8 significant bits).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from . import _bits
from ._registry import FormatKind, register

# element: (ebits, stored mantissa bits, emax, max_normal); ebits == 0 means MXINT8
ELEMENTS = {
    "e4m3": (4, 3, 8, 448.0),
    "e5m2": (5, 2, 15, 57344.0),
    "e3m2": (3, 2, 4, 28.0),
    "e2m3": (2, 3, 2, 7.5),
    "e2m1": (2, 1, 2, 6.0),
    "int8": (0, 6, 0, 127.0 / 64.0),
}

NAMES = {
    "mxfp8_e4m3": "e4m3",
    "mxfp8_e5m2": "e5m2",
    "mxfp6_e3m2": "e3m2",
    "mxfp6_e2m3": "e2m3",
    "mxfp4_e2m1": "e2m1",
    "mxint8": "int8",
}

E8M0_NAN = 255


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """An OCP MX format: element type, block size along the axis, element rounding.

    Fields: ``name`` (e.g. ``'mxfp4_e2m1'``), ``element`` (``'e4m3'``, ..., ``'int8'``),
    ``block_size`` (elements sharing one E8M0 scale, default 32), ``rounding`` (``'even'`` or
    ``'away'``).
    """

    name: str
    element: str
    block_size: int = 32
    rounding: str = "even"

    kind = "mx"
    options = ("block_size", "rounding")

    def __post_init__(self):
        if self.element not in ELEMENTS:
            raise ValueError(f"unknown MX element {self.element!r}; known: {tuple(ELEMENTS)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        _bits.check_rounding(self.rounding)

    @property
    def element_bits(self) -> int:
        """Bits of one element code (sign included)."""
        ebits, mbits = ELEMENTS[self.element][:2]
        return 8 if ebits == 0 else 1 + ebits + mbits

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element, the shared 8-bit scale amortised over the block."""
        return self.element_bits + 8 / self.block_size

    @property
    def emax(self) -> int:
        """Largest unbiased normal exponent of the element format."""
        return ELEMENTS[self.element][2]

    @property
    def max_normal(self) -> float:
        """Largest element magnitude (saturation bound)."""
        return ELEMENTS[self.element][3]


def _exponent_from_amax(amax_bits, fmt):
    """(E, NaN mask) of blocks from the int32 bit pattern of their max |x| (any shape: elementwise)."""
    is_nan = amax_bits > _bits.F32_EXP_MASK
    e = jnp.clip((amax_bits >> 23) - 127 - fmt.emax, -127, 127)
    return e, is_nan


def _block_scale_exponent(xb, fmt, block_axis):
    """Per-block E (int32, keepdims) and a NaN-block mask, from the bits of the block max |x|."""
    return _exponent_from_amax(jnp.max(_bits.abs_bits(xb), axis=block_axis, keepdims=True), fmt)


def _round_elements(v, fmt):
    """Element values P on the element grid (float32), saturating."""
    ebits, mbits, _, max_normal = ELEMENTS[fmt.element]
    if ebits == 0:
        q = _bits.mul_pow2(_bits.round_half(_bits.mul_pow2(v, mbits), fmt.rounding), -mbits)
        return jnp.clip(q, -max_normal, max_normal)
    return _bits.round_to_float_grid(v, ebits, mbits, max_normal, fmt.rounding)


def _quantize_blocks(x, fmt, axis):
    """Blocked float32 element values P, block exponents E, NaN mask and the original axis length."""
    n = x.shape[axis]
    xb = _bits.to_blocks(x.astype(jnp.float32), axis, fmt.block_size)
    e, is_nan = _block_scale_exponent(xb, fmt, axis + 1)
    p = _round_elements(_bits.mul_pow2(xb, -e), fmt)
    return p, e, is_nan, n


def fake_quantize_given_amax(x, amax_bits, fmt: MXFormat):
    """Fake-quantized float32 ``x`` given its block's max |x| bit pattern ``amax_bits`` (int32, x's shape).

    Elementwise: what :func:`fake_quantize` computes once the block maxima are known, for a caller
    that reduces the blocks itself (a kernel holding a block across registers).
    """
    e, is_nan = _exponent_from_amax(amax_bits, fmt)
    x = x.astype(jnp.float32)
    return jnp.where(is_nan, jnp.nan, _bits.mul_pow2(_round_elements(_bits.mul_pow2(x, -e), fmt), e))


def _fake_quantize_words(x, fmt: MXFormat):
    """:func:`fake_quantize` of bf16 ``x`` along its last axis (a multiple of the block, at most 32) on 32-bit words.

    The block max is an unrolled max over the block's ``block_size / 2`` words and the halves are
    unpacked and repacked by shifts (:func:`._bits.bf16_word_halves`); every element value has at
    most 8 significant bits, so the repacking is exact. Measured faster on a GPU than the reduce
    form after a LayerNorm and no slower after a GELU (``benchmarks/activation_cast.py``).
    """
    lo, hi = _bits.bf16_word_halves(x, fmt.block_size // 2)
    amax = _bits.unrolled_max(jnp.maximum(_bits.abs_bits(lo), _bits.abs_bits(hi)), lo.ndim - 1, fmt.block_size // 2)
    amax = jnp.broadcast_to(amax, lo.shape)
    return _bits.bf16_from_word_halves(fake_quantize_given_amax(lo, amax, fmt), fake_quantize_given_amax(hi, amax, fmt),
                                       x.shape)


def fake_quantize(x, fmt: MXFormat, axis: int):
    """Quantize-dequantize ``x`` (float array) along normalised ``axis``; same shape and dtype."""
    if x.dtype == jnp.bfloat16 and axis == x.ndim - 1 and fmt.block_size in (2, 4, 8, 16, 32) and x.shape[axis] % fmt.block_size == 0:
        return _fake_quantize_words(x, fmt)
    p, e, is_nan, n = _quantize_blocks(x, fmt, axis)
    out = jnp.where(is_nan, jnp.nan, _bits.mul_pow2(p, e))
    return _bits.from_blocks(out, axis, n).astype(x.dtype)


def quantize(x, fmt: MXFormat, axis: int):
    """Element codes (uint8; int8 for MXINT8) with x's shape and E8M0 scale bytes (uint8).

    The scale array has x's shape with ``axis`` replaced by ``ceil(n / block_size)``.
    """
    p, e, is_nan, n = _quantize_blocks(x, fmt, axis)
    ebits, mbits = ELEMENTS[fmt.element][:2]
    if ebits == 0:
        codes = _bits.mul_pow2(p, mbits).astype(jnp.int8)
    else:
        codes = _bits.encode_float(p, ebits, mbits)
    scale = jnp.where(is_nan, E8M0_NAN, e + 127).astype(jnp.uint8)
    return _bits.from_blocks(codes, axis, n), jnp.squeeze(scale, axis + 1)


def dequantize(codes, scale, fmt: MXFormat, axis: int, dtype):
    """Values from element codes and E8M0 scale bytes (inverse of :func:`quantize`)."""
    n = codes.shape[axis]
    ebits, mbits = ELEMENTS[fmt.element][:2]
    cb = _bits.to_blocks(codes, axis, fmt.block_size)
    if ebits == 0:
        p = _bits.mul_pow2(cb.astype(jnp.float32), jnp.int32(-mbits))
    else:
        p = _bits.decode_float(cb, ebits, mbits)
    s = jnp.expand_dims(scale.astype(jnp.int32), axis + 1)
    out = jnp.where(s == E8M0_NAN, jnp.nan, _bits.mul_pow2(p, s - 127))
    return _bits.from_blocks(out, axis, n).astype(dtype)


register(FormatKind(
    kind="mx", spec_type=MXFormat, names=lambda: tuple(NAMES),
    from_name=lambda name: MXFormat(name, NAMES[name]) if name in NAMES else None,
    fake=lambda x, spec, axis, scale, zero: fake_quantize(x, spec, axis),
    quantize=lambda x, spec, axis, scale, zero: (*quantize(x, spec, axis), None, None),
    dequantize=lambda codes, scale, zero, micro, spec, axis, dtype: dequantize(codes, scale, spec, axis, dtype),
    signed_codes=lambda spec: spec.element == "int8",
))
