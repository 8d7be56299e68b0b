"""The formats' entry points: resolve a name to a spec, cast, quantize, dequantize, compute scales.

Every function dispatches on ``spec.kind`` through the registry (:mod:`._registry`) each format
module fills; the import line of each module below is its registration (and fixes the order of
:func:`names`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _bits, qtensor
from . import mx, smx, uniform, fp8  # noqa: I001 - registration order: the order of names()
from ._registry import kind_of, kinds
from .qtensor import QTensor, unpack


def names() -> tuple[str, ...]:
    """All known format names."""
    return tuple(n for k in kinds() for n in k.names())


def format_types() -> tuple[type, ...]:
    """The spec classes of the registered kinds."""
    return tuple(k.spec_type for k in kinds())


def _from_name(name: str):
    for k in kinds():
        spec = k.from_name(name)
        if spec is not None:
            return spec
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(names())} (any intN, 2 <= N <= 8)")


def get(fmt, **options):
    """Resolve a name (or spec) plus static options into a frozen, hashable format spec.

    Unknown options raise TypeError naming them and listing the format's valid options.
    """
    if isinstance(fmt, format_types()):
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
    kind = kind_of(spec)
    if (scale is not None or zero is not None) and kind.compute_scale is None:
        raise ValueError(f"scale=/zero= are for int and fp8 formats; {spec.name!r} computes its block scales from x")
    if zero is not None and not kind.accepts_zero:
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
    return kind_of(spec).fake(x, spec, axis, scale, zero)


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


def _select_fake(x, select, hi, lo, axis):
    if hi.kind == lo.kind == "smx":
        return smx.fake_quantize_select(x, select, hi, lo, axis)
    return jnp.where(select, _fake(x, None, None, hi, axis), _fake(x, None, None, lo, axis))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _select_ste(x, select, hi, lo, axis):
    return _select_fake(x, select, hi, lo, axis)


@_select_ste.defjvp
def _select_ste_jvp(hi, lo, axis, primals, tangents):
    x, select = primals
    return _select_ste(x, select, hi, lo, axis), tangents[0]


_select_jit = jax.jit(_select_ste, static_argnums=(2, 3, 4))


def cast_select(x, select, hi, lo, axis=-1):
    """``where(select, cast(x, hi, axis), cast(x, lo, axis))``: a per-element choice between two formats.

    ``select`` (boolean, broadcastable to x's shape) picks ``hi``. Both casts see the whole of
    ``x`` (scales from all of it). Two SMX formats that differ only in mantissa width (``mx9`` /
    ``mx6`` / ``mx4``) run as one cast with a per-element width, the same values bit for bit at
    the cost of about one cast; other pairs compute both. Formats with static parameters
    (``scale=``) are not accepted here. Gradient straight-through, like :func:`cast`.
    """
    specs = []
    for fmt in (hi, lo):
        spec, x = _prepare(x, fmt, axis, None, None, {})
        specs.append(spec)
    select = jnp.asarray(select)
    if select.dtype != jnp.bool_:
        raise TypeError(f"cast_select: select must be a boolean array, got dtype {select.dtype}")
    try:
        select = jnp.broadcast_to(select, x.shape)
    except ValueError:
        raise ValueError(f"cast_select: select of shape {select.shape} does not broadcast to x's shape {x.shape}") from None
    if x.ndim == 0:
        return _select_jit(x[None], select[None], *specs, 0)[0]
    return _select_jit(x, select, *specs, _bits.normalize_axis(axis, x.ndim))


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
    codes, scale_out, zero_out, micro = kind_of(spec).quantize(x, spec, ax, scale, zero)
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
    out = kind_of(spec).dequantize(qt.codes, qt.scale, qt.zero, qt.micro, spec, ax, dtype)
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
    if kind_of(spec).compute_scale is None:
        raise ValueError(f"{spec.name!r} has per-block scales computed inside the cast; compute_scale is for int/fp8")
    return _compute_scale_jit(x, spec, ax)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compute_scale_jit(x, spec, ax):
    return kind_of(spec).compute_scale(x, spec, ax)
