"""jdq.formats: number formats as pure jnp functions (CPU/GPU/TPU; jit, vmap and grad friendly).

One entry point resolves every format by name::

    y = jdq.formats.cast(x, "mxfp4_e2m1", axis=-1)            # fake-quant, straight-through grad
    qt = jdq.formats.quantize(w, "int4", axis=-2, granularity="group", group_size=128)
    w_hat = jdq.formats.dequantize(qt)                         # == cast(...) bit for bit
    spec = jdq.formats.get("mx9")                              # frozen, hashable spec
    spec.bits_per_element, spec.block_size, spec.kind          # 9.0, 16, 'smx'

Names (see :func:`names`): OCP MX ``mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1
mxint8`` (:mod:`.mx`), shared-microexponent ``mx9 mx6 mx4`` (:mod:`.smx`), uniform integers
``int2`` ... ``int8`` (:mod:`.uniform`), scaled FP8 ``fp8_e4m3 fp8_e5m2`` (:mod:`.fp8`). Each
module's docstring documents its exact rounding, saturation, NaN/Inf/zero and padding rules.

``axis`` is the contraction axis of the operand: MX/SMX blocks and integer groups run along it
(an activation ``(..., C)``: ``axis=-1``; a weight stored ``(in, out)``: ``axis=-2``). Inputs must
have a real floating dtype; results have the input's shape and dtype (computation is float32).
float64 is no exception to the float32 computation: without ``jax_enable_x64`` JAX turns a float64
input into float32 on entry, so the result is float32; with it, the result is float64 holding the
float32 computation's values. The quantized axis must not be empty (a ValueError), nor any axis of
a ``'tensor'``/``'input_channel'``-granularity cast, whose scale reduces over them.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from . import _bits, fp8, mx, qtensor, smx, uniform
from .fp8 import FP8Format
from .mx import MXFormat
from .qtensor import QTensor, pack, pack_bits, unpack, unpack_bits
from .smx import SMXFormat
from .uniform import IntFormat

__all__ = [
    "FP8Format", "IntFormat", "MXFormat", "QTensor", "SMXFormat", "cast", "check_static_params", "compute_scale",
    "dequantize", "get", "names", "pack", "pack_bits", "quantize", "unpack", "unpack_bits",
]

FORMAT_TYPES = (MXFormat, SMXFormat, IntFormat, FP8Format)
_INT_NAME = re.compile(r"int(\d+)$")


def names() -> tuple[str, ...]:
    """All known format names."""
    return (*mx.NAMES, *smx.NAMES, *(f"int{b}" for b in range(8, 1, -1)), *fp8.NAMES)


def _from_name(name: str):
    if name in mx.NAMES:
        return MXFormat(name, mx.NAMES[name])
    if name in smx.NAMES:
        return SMXFormat(name, smx.NAMES[name])
    if name in fp8.NAMES:
        return FP8Format(name, fp8.NAMES[name])
    match = _INT_NAME.match(name)
    if match:
        bits = int(match.group(1))
        if not 2 <= bits <= 8:
            raise ValueError(f"integer bit width must be in [2, 8], got {name!r}")
        return IntFormat(name, bits)
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(names())} (any intN, 2 <= N <= 8)")


def get(fmt, **options):
    """Resolve a name (or spec) plus static options into a frozen, hashable format spec.

    Unknown options raise TypeError naming them and listing the format's valid options.
    """
    if isinstance(fmt, FORMAT_TYPES):
        spec = fmt
    elif isinstance(fmt, str):
        spec = _from_name(fmt)
    else:
        raise TypeError(f"fmt must be a format name or a spec from jdq.formats.get, got {type(fmt).__name__}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for format {spec.name!r}; "
            f"valid options: {', '.join(spec.options)}"
        )
    return dataclasses.replace(spec, **options) if options else spec


def _prepare(x, fmt, axis, scale, zero, options):
    spec = get(fmt, **options)
    x = _bits.check_float_input(x)
    if (scale is not None or zero is not None) and spec.kind in ("mx", "smx"):
        raise ValueError(f"scale=/zero= are for int and fp8 formats; {spec.name!r} computes its block scales from x")
    if zero is not None and spec.kind == "fp8":
        raise ValueError("zero= is only meaningful for asymmetric int formats")
    check_nonempty(x, spec, axis)
    check_static_params(scale, zero)
    return spec, x


def check_nonempty(x, spec, axis):
    """ValueError if the scale of ``spec`` along ``axis`` would reduce over no elements."""
    if x.ndim == 0:
        return
    ax = _bits.normalize_axis(axis, x.ndim)
    if x.shape[ax] == 0:
        raise ValueError(f"cannot quantize along axis {axis}: it is empty (x has shape {tuple(x.shape)})")
    if x.size == 0 and getattr(spec, "granularity", None) in ("tensor", "input_channel"):
        raise ValueError(f"cannot compute a {spec.granularity!r} scale of an empty array (shape {tuple(x.shape)})")


def _concrete(a):
    """``a`` as a numpy array if its value is known now (not a tracer inside jit/vmap), else None."""
    if a is None or isinstance(a, jax.core.Tracer):
        return None
    return np.asarray(a, np.float32)


def check_static_params(scale, zero):
    """ValueError for a concrete static scale that is NaN, Inf or negative, or a non-finite zero point.

    0 is accepted: the scale of an all-zero group (applied as 2**-126, see :mod:`.uniform`). A
    traced value (inside ``jax.jit``) cannot be inspected and is not checked.
    """
    s = _concrete(scale)
    if s is not None:
        bad = ~np.isfinite(s) | (s < 0)
        if bad.any():
            first = s[bad].flat[0]
            raise ValueError(f"static scale has {int(bad.sum())} invalid value(s) of {s.size} (e.g. {first}); "
                             f"a scale must be finite and >= 0")
    z = _concrete(zero)
    if z is not None and not np.isfinite(z).all():
        raise ValueError(f"static zero point has {int((~np.isfinite(z)).sum())} NaN or Inf value(s); it must be finite")


def _fake(x, scale, zero, spec, axis):
    if spec.kind == "mx":
        return mx.fake_quantize(x, spec, axis)
    if spec.kind == "smx":
        return smx.fake_quantize(x, spec, axis)
    if spec.kind == "int":
        return uniform.fake_quantize(x, spec, axis, scale, zero)
    return fp8.fake_quantize(x, spec, axis, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fake_ste(x, scale, zero, spec, axis):
    return _fake(x, scale, zero, spec, axis)


@_fake_ste.defjvp
def _fake_ste_jvp(spec, axis, primals, tangents):
    x, scale, zero = primals
    return _fake_ste(x, scale, zero, spec, axis), tangents[0]


# jitted once per (shape, dtype, spec, axis): eager calls compile one fused kernel instead of
# dispatching op by op; inside a user's jit these inline.
_fake_jit = jax.jit(_fake_ste, static_argnums=(3, 4))


def cast(x, fmt, axis=-1, *, scale=None, zero=None, **options):
    """Fake-quantize ``x``: quantize to ``fmt`` along ``axis`` and dequantize, same shape and dtype.

    The gradient is straight-through (d cast / dx = 1; none flows to ``scale``/``zero``).
    ``scale=``/``zero=`` give static parameters (int/fp8 formats); ``options`` are the format's
    static options (see :func:`get`).
    """
    spec, x = _prepare(x, fmt, axis, scale, zero, options)
    if x.ndim == 0:
        return _fake_jit(x[None], scale, zero, spec, 0)[0]
    return _fake_jit(x, scale, zero, spec, _bits.normalize_axis(axis, x.ndim))


def quantize(x, fmt, axis=-1, *, scale=None, zero=None, pack: bool = False, **options) -> QTensor:
    """Quantize ``x`` into a :class:`QTensor` (codes + scales; bit-packed along the axis if ``pack``)."""
    spec, x = _prepare(x, fmt, axis, scale, zero, options)
    shape = x.shape
    if x.ndim == 0:
        x, ax = x[None], 0
    else:
        ax = _bits.normalize_axis(axis, x.ndim)
    return _quantize_jit(x, scale, zero, spec, ax, tuple(shape), bool(pack))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _quantize_jit(x, scale, zero, spec, ax, shape, pack):
    zero_out = micro = None
    if spec.kind == "mx":
        codes, scale_out = mx.quantize(x, spec, ax)
    elif spec.kind == "smx":
        codes, scale_out, micro = smx.quantize(x, spec, ax)
    elif spec.kind == "int":
        codes, scale_out, zero_out = uniform.quantize(x, spec, ax, scale, zero)
    else:
        codes, scale_out = fp8.quantize(x, spec, ax, scale)
    qt = QTensor(codes, scale_out, zero_out, micro, spec, ax, shape, jnp.dtype(x.dtype))
    return qtensor.pack(qt) if pack else qt


def dequantize(qt: QTensor, dtype=None):
    """Values of a :class:`QTensor` (packed or not), in ``dtype`` (default: the original dtype)."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    return _dequantize_jit(qt, qt.dtype if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(qt, dtype):
    qt = unpack(qt)
    spec, ax = qt.fmt, qt.axis
    if spec.kind == "mx":
        out = mx.dequantize(qt.codes, qt.scale, spec, ax, dtype)
    elif spec.kind == "smx":
        out = smx.dequantize(qt.codes, qt.scale, qt.micro, spec, ax, dtype)
    elif spec.kind == "int":
        out = uniform.dequantize(qt.codes, qt.scale, qt.zero, spec, ax, dtype)
    else:
        out = fp8.dequantize(qt.codes, qt.scale, spec, ax, dtype)
    return out.reshape(qt.shape)


def compute_scale(x, fmt, axis=-1, **options):
    """Dynamic (min-max) ``(scale, zero)`` of ``x`` for an int/fp8 format, in the static-scale shape.

    Passing them back as ``cast(x, fmt, axis, scale=scale, zero=zero)`` reproduces the dynamic cast.
    ``zero`` is None unless the format is asymmetric int.
    """
    spec = get(fmt, **options)
    x = _bits.check_float_input(x)
    ax = _bits.normalize_axis(axis, x.ndim)
    check_nonempty(x, spec, ax)
    if spec.kind not in ("int", "fp8"):
        raise ValueError(f"{spec.name!r} has per-block scales computed inside the cast; compute_scale is for int/fp8")
    return _compute_scale_jit(x, spec, ax)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compute_scale_jit(x, spec, ax):
    if spec.kind == "int":
        return uniform.compute_scale(x, spec, ax)
    return fp8.compute_scale(x, spec, ax), None
