"""Scaled FP8 (OCP E4M3 "fn" and E5M2) with a float32 scale per tensor, row, group or channel.

``v = x * (1 / s)`` is rounded onto the FP8 grid (round-half-to-even by default, ``rounding='away'``
available), FP8 subnormals kept, **saturating** at ``±max`` (448 for E4M3, 57344 for E5M2; no Inf
or NaN is produced from finite or infinite input), and the value is ``q * s``.

* Dynamic scale: ``s = amax * float32(1 / max)`` over the scale group (amax/448 or amax/57344; the
  arithmetic is spelled as reciprocal-multiplies for the reason given in :mod:`.uniform`), so the group's
  largest magnitude maps onto the largest FP8 value. Scales below ``2**-126`` are applied as
  ``2**-126`` (all-zero groups give zeros). NaN or Inf in a group makes the group NaN.
* Static scale: ``scale=`` broadcastable to the shape listed in :mod:`jdq.formats.uniform`.
* ``granularity=None``: an unscaled, saturating direct cast to FP8 (``s = 1``); NaN stays NaN and
  ±Inf saturates to ±max.

Granularities and scale shapes are those of :mod:`jdq.formats.uniform` (default ``'row'``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from . import _bits, uniform
from ._registry import FormatKind, register

ELEMENTS = {"e4m3": (4, 3, 448.0), "e5m2": (5, 2, 57344.0)}
NAMES = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}


@dataclasses.dataclass(frozen=True)
class FP8Format:
    """Scaled FP8 format.

    Fields: ``name``, ``element`` (``'e4m3'`` or ``'e5m2'``), ``granularity`` (``'tensor' | 'row' |
    'group' | 'input_channel'`` or None for an unscaled cast; default ``'row'``), ``group_size``
    (with ``'group'`` only), ``rounding`` (``'even'`` or ``'away'``).
    """

    name: str
    element: str
    granularity: str | None = "row"
    group_size: int | None = None
    rounding: str = "even"

    kind = "fp8"
    options = ("granularity", "group_size", "rounding")
    bits = 8
    element_bits = 8

    def __post_init__(self):
        if self.element not in ELEMENTS:
            raise ValueError(f"unknown FP8 element {self.element!r}; known: {tuple(ELEMENTS)}")
        g = uniform.canonical_granularity(self.granularity, self.group_size, allow_none=True)
        object.__setattr__(self, "granularity", g)
        _bits.check_rounding(self.rounding)

    @property
    def block_size(self):
        """Elements sharing one scale along the axis for 'group' granularity, else None."""
        return self.group_size if self.granularity == "group" else None

    @property
    def bits_per_element(self) -> float:
        """Average storage bits; a group's 16-bit scale amortised for 'group', else 8."""
        return 8.0 if self.granularity != "group" else 8 + 16 / self.group_size

    @property
    def max_normal(self) -> float:
        """Largest finite FP8 magnitude (saturation bound)."""
        return ELEMENTS[self.element][2]


def _encode(q, fmt):
    """OCP FP8 bit codes; NaN -> 0x7F / 0xFF (a NaN code of both E4M3 and E5M2)."""
    ebits, mbits, _ = ELEMENTS[fmt.element]
    codes = _bits.encode_float(jnp.where(jnp.isnan(q), 0.0, q), ebits, mbits)
    return jnp.where(jnp.isnan(q), codes | 0x7F, codes)


def _decode(codes, fmt):
    """Float32 values of OCP FP8 codes, NaN (and, for E5M2, Inf) codes included."""
    ebits, mbits, _ = ELEMENTS[fmt.element]
    q = _bits.decode_float(codes, ebits, mbits)
    c = codes.astype(jnp.int32) & 0x7F
    if fmt.element == "e4m3":
        return jnp.where(c == 0x7F, jnp.nan, q)
    inf = jnp.where(q < 0, -jnp.inf, jnp.inf)
    return jnp.where(c > 0x7C, jnp.nan, jnp.where(c == 0x7C, inf, q))


def _round(v, fmt):
    ebits, mbits, max_normal = ELEMENTS[fmt.element]
    return _bits.round_to_float_grid(v, ebits, mbits, max_normal, fmt.rounding)


def _scale_of_amax(amax, fmt):
    return amax * np.float32(1.0 / fmt.max_normal)


def _params(x, fmt, axis, scale):
    xf = x.astype(jnp.float32)
    if fmt.granularity is None:
        if scale is not None:
            raise ValueError("scale= needs a granularity; granularity=None is the unscaled FP8 cast")
        return xf, None
    xw, red = uniform.working_layout(xf, fmt.granularity, fmt.group_size, axis)
    if scale is None:
        scale = _scale_of_amax(jnp.max(jnp.abs(xw), axis=red, keepdims=True), fmt)
    else:
        scale = uniform.to_working(scale, x.shape, fmt.granularity, fmt.group_size, axis, "scale")
    return xw, scale


def _finish(out, x, fmt, axis):
    if fmt.granularity == "group":
        out = _bits.from_blocks(out, axis, x.shape[axis])
    return out


def _scaled_round(xw, scale, fmt):
    s, r = uniform.reciprocal(scale)
    return _round(xw * r, fmt) * s


def fake_quantize(x, fmt: FP8Format, axis, scale=None):
    """Quantize-dequantize ``x`` along normalised ``axis``; static when ``scale`` is given."""
    xw, scale = _params(x, fmt, axis, scale)
    if scale is None:
        return _round(xw, fmt).astype(x.dtype)
    return _finish(_scaled_round(xw, scale, fmt), x, fmt, axis).astype(x.dtype)


def fake_quantize_given_amax(x, amax, fmt: FP8Format):
    """Fake-quantized float32 ``x`` given its scale group's max |x| ``amax`` (float32, broadcastable to x).

    Elementwise: what :func:`fake_quantize` computes with a dynamic scale once the group maxima are
    known, for a caller that knows or reduces them itself (a kernel holding a row across registers).
    """
    if fmt.granularity is None:
        raise ValueError("fake_quantize_given_amax: granularity=None is the unscaled FP8 cast (no amax)")
    return _scaled_round(x.astype(jnp.float32), _scale_of_amax(jnp.asarray(amax, jnp.float32), fmt), fmt)


def quantize(x, fmt: FP8Format, axis, scale=None):
    """FP8 bit codes (uint8, x's shape; the OCP float8 bit pattern) and the scale (public shape or None)."""
    xw, scale = _params(x, fmt, axis, scale)
    if scale is None:
        return _encode(_round(xw, fmt), fmt), None
    q = _round(xw * uniform.reciprocal(scale)[1], fmt)
    codes = _finish(_encode(q, fmt), x, fmt, axis)
    return codes, uniform.to_public(scale, fmt.granularity, axis)


def dequantize(codes, scale, fmt: FP8Format, axis, dtype):
    """Values ``decode(code) * scale`` (inverse of :func:`quantize`)."""
    if fmt.granularity is None:
        return _decode(codes, fmt).astype(dtype)
    n = codes.shape[axis]
    cw, _ = uniform.working_layout(codes, fmt.granularity, fmt.group_size, axis)
    s, _ = uniform.reciprocal(uniform.to_working(scale, codes.shape, fmt.granularity, fmt.group_size, axis, "scale"))
    out = _decode(cw, fmt) * s
    if fmt.granularity == "group":
        out = _bits.from_blocks(out, axis, n)
    return out.astype(dtype)


def compute_scale(x, fmt: FP8Format, axis):
    """Dynamic scale ``amax / max`` of ``x`` in the static-scale shape."""
    if fmt.granularity is None:
        raise ValueError("granularity=None is the unscaled FP8 cast: it has no scale")
    _, scale = _params(x, fmt, axis, None)
    return uniform.to_public(scale, fmt.granularity, axis)


register(FormatKind(
    kind="fp8", spec_type=FP8Format, names=lambda: tuple(NAMES),
    from_name=lambda name: FP8Format(name, NAMES[name]) if name in NAMES else None,
    fake=lambda x, spec, axis, scale, zero: fake_quantize(x, spec, axis, scale),
    quantize=lambda x, spec, axis, scale, zero: (*quantize(x, spec, axis, scale), None, None),
    dequantize=lambda codes, scale, zero, micro, spec, axis, dtype: dequantize(codes, scale, spec, axis, dtype),
    compute_scale=lambda x, spec, axis: (compute_scale(x, spec, axis), None),
))
