"""Uniform integer formats INT-b (2 <= b <= 8) with a float scale per tensor, row, group or channel.

Definitions (``b`` bits, ``x`` the input, ``s`` the scale, ``z`` the zero point):

* **Symmetric** (default, ``symmetric=True``): signed codes ``q = clamp(round(x * r), -Q, Q)``
  with ``Q = 2**(b-1) - 1`` (the range is symmetric, ``-2**(b-1)`` is never used), value ``q * s``.
  Dynamic scale ``s = amax * float32(1 / Q)``.
* **Asymmetric** (``symmetric=False``, ViDiT-Q style): unsigned codes
  ``q = clamp(round(x * r) + z, 0, 2**b - 1)``, value ``(q - z) * s``. Dynamic parameters from the
  min/max with ``x_min`` clipped to ``<= 0`` and ``x_max`` to ``>= 0``:
  ``s = (x_max - x_min) * float32(1 / (2**b - 1))``, ``z = round(-x_min * r)``.
* ``r = 1 / s`` is the float32 reciprocal of the scale, computed once per scale. Spelling the
  arithmetic as reciprocal-multiplies is deliberate: XLA rewrites ``x / s`` into ``x * (1 / s)`` on
  its own in some fusions, so only this form gives the same bits everywhere (and in a kernel).
* ``round`` is round-half-to-even (``rounding='even'``, default) or ties away from zero
  (``rounding='away'``); the zero point uses the same rounding.
* A scale below ``2**-126`` (e.g. an all-zero group) is replaced by ``2**-126`` when applied, so an
  all-zero group gives zeros, never NaN. A NaN or Inf anywhere in a scale group makes its dynamic
  scale non-finite, and the whole group dequantizes to NaN (never silently finite). A finite range
  wider than float32's largest value (``x_max - x_min`` overflows) still gets a finite scale.
* A static ``scale`` (or ``zero``) given as a concrete array is checked when the cast is called: a
  NaN, Inf or negative scale, or a non-finite zero point, is a ValueError. A scale of exactly 0 is
  accepted (it is what :func:`compute_scale` returns for an all-zero group) and applied as
  ``2**-126``. Inside ``jax.jit`` a traced scale cannot be checked; validate it where it is made
  (a plan's ``init``).

Granularity (which elements share one scale; ``axis`` is the contraction axis of the operand):

=================  ======================================================  ==============================
granularity        one scale per                                           static ``scale`` shape
=================  ======================================================  ==============================
``'tensor'``       whole tensor                                            ``()``
``'row'``          1-D slice along ``axis`` (per token for activations,    x.shape with ``axis`` -> 1
                   per output channel for weights; aliases ``'token'``,
                   ``'output_channel'``)
``'group'``        ``group_size`` consecutive elements along ``axis``      x.shape with ``axis`` ->
                   (the axis is zero-padded to a multiple)                 ``ceil(n / group_size)``
``'input_channel'`` index along ``axis`` (shared by all rows)              all 1 except ``axis`` -> n
=================  ======================================================  ==============================

Static quantization: pass ``scale=`` (and ``zero=`` when asymmetric), any array broadcastable to
the shape above (:func:`jdq.formats.compute_scale` returns exactly that shape). Otherwise the
parameters are computed from ``x`` (dynamic, min-max).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from . import _bits
from ._registry import FormatKind, register

GRANULARITIES = ("tensor", "row", "group", "input_channel")
GRANULARITY_ALIASES = {"token": "row", "output_channel": "row", "per_token": "row", "per_tensor": "tensor"}
MIN_SCALE = 2.0**-126


def canonical_granularity(granularity, group_size, allow_none=False):
    """Resolve aliases and check that ``group_size`` is given exactly when granularity is 'group'."""
    if granularity is None and allow_none:
        if group_size is not None:
            raise ValueError("group_size is only meaningful with granularity='group'")
        return None
    g = GRANULARITY_ALIASES.get(granularity, granularity)
    if g not in GRANULARITIES:
        known = GRANULARITIES + tuple(GRANULARITY_ALIASES) + ((None,) if allow_none else ())
        raise ValueError(f"granularity must be one of {known}, got {granularity!r}")
    if g == "group":
        if not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ValueError(f"granularity='group' needs a positive int group_size, got {group_size!r}")
    elif group_size is not None:
        raise ValueError(f"group_size is only meaningful with granularity='group', got granularity={granularity!r}")
    return g


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """Uniform INT-b format.

    Fields: ``name`` (``'int<b>'``), ``bits`` (2..8), ``symmetric`` (default True), ``granularity``
    (``'tensor' | 'row' | 'group' | 'input_channel'``, default ``'row'``), ``group_size`` (with
    ``'group'`` only), ``rounding`` (``'even'`` or ``'away'``).
    """

    name: str
    bits: int
    symmetric: bool = True
    granularity: str = "row"
    group_size: int | None = None
    rounding: str = "even"

    kind = "int"
    options = ("symmetric", "granularity", "group_size", "rounding")

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 8:
            raise ValueError(f"integer bit width must be in [2, 8], got bits={self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        object.__setattr__(self, "granularity", canonical_granularity(self.granularity, self.group_size))
        _bits.check_rounding(self.rounding)

    @property
    def block_size(self):
        """Elements sharing one scale along the axis for 'group' granularity, else None."""
        return self.group_size if self.granularity == "group" else None

    @property
    def element_bits(self) -> int:
        """Bits of one element code."""
        return self.bits

    @property
    def bits_per_element(self) -> float:
        """Average storage bits; a group's 16-bit scale (and b-bit zero point) amortised for 'group'.

        Per-tensor/row/channel scales are amortised over a whole row or tensor and counted as 0.
        """
        if self.granularity != "group":
            return float(self.bits)
        return self.bits + (16 + (0 if self.symmetric else self.bits)) / self.group_size

    @property
    def qmax(self) -> int:
        """Largest code magnitude (symmetric) or largest code (asymmetric)."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


# ---------------------------------------------------------------------------- scale layouts


def working_layout(x, granularity, group_size, axis):
    """``x`` in the layout where scales broadcast (blocked for 'group') and the axes to reduce."""
    if granularity == "group":
        return _bits.to_blocks(x, axis, group_size), (axis + 1,)
    if granularity == "tensor":
        return x, tuple(range(x.ndim))
    if granularity == "row":
        return x, (axis,)
    return x, tuple(i for i in range(x.ndim) if i != axis)


def public_scale_shape(shape, granularity, group_size, axis):
    """Shape of a static scale (and zero point) for an input of ``shape``; see the module table."""
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return shape[:axis] + (1,) + shape[axis + 1 :]
    if granularity == "group":
        return shape[:axis] + (-(-shape[axis] // group_size),) + shape[axis + 1 :]
    return tuple(n if i == axis else 1 for i, n in enumerate(shape))


def to_working(param, shape, granularity, group_size, axis, what):
    """Broadcast a user-given scale/zero to the public shape, then into the working layout."""
    param = jnp.asarray(param, jnp.float32)
    target = public_scale_shape(shape, granularity, group_size, axis)
    try:
        param = jnp.broadcast_to(param, target)
    except ValueError:
        raise ValueError(
            f"{what} of shape {param.shape} does not broadcast to {target}, the {what} shape for "
            f"granularity={granularity!r}, axis={axis} and input shape {tuple(shape)}"
        ) from None
    if granularity == "group":
        param = jnp.expand_dims(param, axis + 1)
    return param


def to_public(param, granularity, axis):
    """Working-layout parameter (keepdims) -> public shape."""
    if granularity == "tensor":
        return param.reshape(())
    if granularity == "group":
        return jnp.squeeze(param, axis + 1)
    return param


# ---------------------------------------------------------------------------- INT-b


def dynamic_params(xw, fmt: IntFormat, reduce_axes):
    """Min-max scale (and zero point) of the working-layout float32 array ``xw``."""
    inv_qmax = np.float32(1.0 / fmt.qmax)
    if fmt.symmetric:
        amax = jnp.max(jnp.abs(xw), axis=reduce_axes, keepdims=True)
        return amax * inv_qmax, None
    lo = jnp.minimum(jnp.min(xw, axis=reduce_axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(xw, axis=reduce_axes, keepdims=True), 0.0)
    span = hi - lo
    # hi - lo overflows to Inf for a finite range wider than float32's max (e.g. ±3.4e38); then
    # hi·c − lo·c (c = 1/qmax ≤ 1/3, each term finite) is the scale. Elsewhere the bits are unchanged,
    # and a NaN or Inf input still gives a non-finite scale (hi or lo is not finite then).
    fallback = jnp.isinf(span) & jnp.isfinite(hi) & jnp.isfinite(lo)
    scale = jnp.where(fallback, hi * inv_qmax - lo * inv_qmax, span * inv_qmax)
    zero = _bits.round_half(-lo * reciprocal(scale)[1], fmt.rounding)
    return scale, zero


def reciprocal(scale):
    """The applied scale ``max(scale, 2**-126)`` and its float32 reciprocal."""
    s = jnp.maximum(scale, MIN_SCALE)
    return s, 1.0 / s


def _codes(xw, fmt, scale, zero):
    s, r = reciprocal(scale)
    q = _bits.round_half(xw * r, fmt.rounding)
    if fmt.symmetric:
        return jnp.clip(q, -fmt.qmax, fmt.qmax), s
    return jnp.clip(q + zero, 0, fmt.qmax), s


F32_MAX = float(np.finfo(np.float32).max)


def _values(q, s, zero, fmt):
    # clipping changes nothing but a value that rounded past float32's largest (a range near ±3.4e38);
    # NaN (a group with a NaN or Inf input) stays NaN
    v = q * s if fmt.symmetric else (q - zero) * s
    return jnp.clip(v, -F32_MAX, F32_MAX)


def _params(x, fmt, axis, scale, zero):
    if fmt.symmetric and zero is not None:
        raise ValueError("zero= is only meaningful for an asymmetric format (symmetric=False)")
    xw, red = working_layout(x.astype(jnp.float32), fmt.granularity, fmt.group_size, axis)
    if scale is None:
        if zero is not None:
            raise ValueError("zero= was given without scale=; static quantization needs both")
        scale, zero = dynamic_params(xw, fmt, red)
    else:
        if not fmt.symmetric and zero is None:
            raise ValueError("static asymmetric quantization needs zero= as well as scale=")
        scale = to_working(scale, x.shape, fmt.granularity, fmt.group_size, axis, "scale")
        if zero is not None:
            zero = to_working(zero, x.shape, fmt.granularity, fmt.group_size, axis, "zero")
    return xw, scale, zero


def fake_quantize(x, fmt: IntFormat, axis, scale=None, zero=None):
    """Quantize-dequantize ``x`` along normalised ``axis``; static when ``scale`` is given."""
    xw, scale, zero = _params(x, fmt, axis, scale, zero)
    q, s = _codes(xw, fmt, scale, zero)
    out = _values(q, s, zero, fmt)
    if fmt.granularity == "group":
        out = _bits.from_blocks(out, axis, x.shape[axis])
    return out.astype(x.dtype)


def quantize(x, fmt: IntFormat, axis, scale=None, zero=None):
    """Codes (int8 signed if symmetric, uint8 if asymmetric, x's shape), scale and zero (public shapes)."""
    xw, scale, zero = _params(x, fmt, axis, scale, zero)
    q, _ = _codes(xw, fmt, scale, zero)
    if fmt.granularity == "group":
        q = _bits.from_blocks(q, axis, x.shape[axis])
    codes = q.astype(jnp.int8 if fmt.symmetric else jnp.uint8)
    scale = to_public(scale, fmt.granularity, axis)
    zero = None if zero is None else to_public(zero, fmt.granularity, axis)
    return codes, scale, zero


def dequantize(codes, scale, zero, fmt: IntFormat, axis, dtype):
    """Values ``(code - zero) * scale`` (inverse of :func:`quantize`)."""
    n = codes.shape[axis]
    qw, _ = working_layout(codes.astype(jnp.float32), fmt.granularity, fmt.group_size, axis)
    s, _ = reciprocal(to_working(scale, codes.shape, fmt.granularity, fmt.group_size, axis, "scale"))
    if zero is not None:
        zero = to_working(zero, codes.shape, fmt.granularity, fmt.group_size, axis, "zero")
    out = _values(qw, s, zero, fmt)
    if fmt.granularity == "group":
        out = _bits.from_blocks(out, axis, n)
    return out.astype(dtype)


def compute_scale(x, fmt: IntFormat, axis):
    """Dynamic (min-max) scale and zero point of ``x`` in the static-scale shape (zero None if symmetric)."""
    xw, red = working_layout(x.astype(jnp.float32), fmt.granularity, fmt.group_size, axis)
    scale, zero = dynamic_params(xw, fmt, red)
    return to_public(scale, fmt.granularity, axis), None if zero is None else to_public(zero, fmt.granularity, axis)


_INT_NAME = re.compile(r"int(\d+)$")


def from_name(name: str) -> IntFormat | None:
    """``intN`` (2 <= N <= 8) as an :class:`IntFormat`; ``None`` for other names; an error for other widths."""
    match = _INT_NAME.match(name)
    if not match:
        return None
    bits = int(match.group(1))
    if not 2 <= bits <= 8:
        raise ValueError(f"integer bit width must be in [2, 8], got {name!r}")
    return IntFormat(name, bits)


register(FormatKind(
    kind="int", spec_type=IntFormat, names=lambda: tuple(f"int{b}" for b in range(8, 1, -1)), from_name=from_name,
    fake=fake_quantize,
    quantize=lambda x, spec, axis, scale, zero: (*quantize(x, spec, axis, scale, zero), None),
    dequantize=lambda codes, scale, zero, micro, spec, axis, dtype: dequantize(codes, scale, zero, spec, axis, dtype),
    compute_scale=compute_scale, accepts_zero=True, signed_codes=lambda spec: spec.symmetric,
))
