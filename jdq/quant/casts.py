"""Format casts as quantization transforms: any :mod:`jdq.formats` format, static or dynamic scales.

:func:`cast` turns ``jdq.formats.cast(x, fmt, axis=ctx.axis, **options)`` into a
:class:`~jdq.quant.QuantTransform`. The cast runs along the operand's contraction axis
(``ctx.axis``: ``-1`` for an activation, ``-2`` for a ``(in, out)`` weight, as the model reports
it), so the same transform serves weights and activations.

Scaling (``meta.scaling``):

* ``"dynamic"`` (default for int/fp8): the scale is computed from the operand at every call
  (per-token activations, ViDiT-Q / Q-DiT). For a **weight** this *is* static quantization: the
  weight does not change, so its per-output-channel (``granularity="row"``) scale is a constant
  that the kernel lowering computes once. Use it for per-output-channel / per-group weights.
* ``"static"``: the scale (and zero point) come from calibration statistics, fixed at ``init``:
  ``granularity="tensor"`` uses the operand's calibrated ``absmax`` (symmetric int, fp8) or
  ``min``/``max`` (asymmetric int), ``"input_channel"`` the per-contraction-index
  ``absmax_channel`` or ``min_channel``/``max_channel``; the steps are reduced by ``reduce``
  (``"max"``: the widest range seen, ``"mean"``: the mean over steps of each statistic). The scale
  is exactly what :func:`jdq.formats.compute_scale` returns for data with that range (symmetric:
  ``max|x| / Q``; asymmetric: ``(max−min)/(2^b−1)`` with ``min ≤ 0 ≤ max`` and a rounded zero
  point; FP8: ``max|x| / max_normal``). Row and group scales follow each row's data and cannot
  be static: asking for them raises ``ValueError``.
* ``"block"``: MX / shared-microexponent formats; their power-of-two block scales always come
  from the data (no static option).
* ``"none"``: FP8 with ``granularity=None`` (an unscaled saturating cast).

``meta`` is a :class:`CastMeta` (format name, resolved hashable spec, scaling, granularity,
options), read by the kernel lowering and the cost model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jdq.quant.transform import QuantTransform

STATIC_GRANULARITIES = ("tensor", "input_channel")
REDUCTIONS = ("max", "mean")


def along_axis(v, ndim: int, axis: int):
    """Reshape a vector so that it broadcasts along ``axis`` of an ``ndim``-dimensional array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return jnp.reshape(v, shape)


@dataclasses.dataclass(frozen=True)
class CastMeta:
    """``meta`` of a format cast: format name, resolved spec, scaling, granularity and options."""

    kind: ClassVar[str] = "cast"
    fmt: str
    spec: Any  # the hashable spec from jdq.formats.get(fmt, **options)
    scaling: str  # "dynamic" | "static" | "block" | "none"
    granularity: str | None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element of the format (scales amortised as the format defines)."""
        return float(self.spec.bits_per_element)


def _freeze(v):
    return tuple(_freeze(a) for a in v) if isinstance(v, (list, tuple)) else v


def resolve_format(fmt, options=None):
    """The hashable spec of ``fmt`` with ``options`` (``jdq.formats.get``); errors name bad options."""
    from jdq import formats

    return formats.get(fmt, **(options or {}))


def _reduce(stats, key, how):
    v = jnp.asarray(stats[key], jnp.float32)
    if v.ndim == 0:  # no step axis (a single observation)
        return v
    if how == "mean":
        return v.mean(0)
    return v.min(0) if key.startswith("min") else v.max(0)


def cast(fmt, *, static: bool = False, reduce: str = "max", **options) -> QuantTransform:
    """Fake-quantize the operand to ``fmt`` along ``ctx.axis``; static scales from stats or dynamic.

    ``options`` are the format's options (``granularity``, ``group_size``, ``symmetric``,
    ``rounding``, ``block_size``, ...), checked now. With ``static=True`` the state is
    ``{"scale", "zero"}`` (``zero`` is ``None`` unless asymmetric int); otherwise ``()``.
    """
    from jdq import formats

    spec = resolve_format(fmt, options)
    options = tuple(sorted((k, _freeze(v)) for k, v in options.items()))
    granularity = getattr(spec, "granularity", None)
    if spec.kind in ("mx", "smx"):
        scaling = "block"
    elif spec.kind == "fp8" and granularity is None:
        scaling = "none"
    else:
        scaling = "static" if static else "dynamic"
    if static and scaling != "static":
        raise ValueError(f"cast({spec.name!r}, static=True): {spec.name} scales come from the data ({scaling}); "
                         "static scales are for int and scaled fp8 formats")
    if static and granularity not in STATIC_GRANULARITIES:
        raise ValueError(
            f"cast({spec.name!r}, static=True): granularity {granularity!r} has one scale per row or group of "
            f"the current input, which calibration cannot fix; use one of {STATIC_GRANULARITIES}, or "
            "static=False (for a weight, a dynamic row scale is a constant)"
        )
    if reduce not in REDUCTIONS:
        raise ValueError(f"cast: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    meta = CastMeta(spec.name, spec, scaling, granularity, options)

    if scaling != "static":
        def apply(x, state, ctx):
            return formats.cast(x, spec, axis=ctx.axis)

        return QuantTransform(lambda stats: (), apply, meta)

    per_channel = granularity == "input_channel"
    suffix = "_channel" if per_channel else ""
    symmetric = getattr(spec, "symmetric", True)

    def init(stats):
        if symmetric:  # the |max| per step (reduce="mean" averages it), as a range [-a, a]
            hi = _reduce(stats, "absmax" + suffix, reduce)
            lo = -hi
        else:
            lo, hi = _reduce(stats, "min" + suffix, reduce), _reduce(stats, "max" + suffix, reduce)
        scale, zero = formats.compute_scale(jnp.stack([lo, hi]), spec, axis=-1 if per_channel else 0)
        try:  # concrete at plan.init: a NaN/Inf statistic must not become a scale that NaNs every output
            formats.check_static_params(scale, zero)
        except ValueError as e:
            raise ValueError(f"cast({spec.name!r}, static=True): the calibration statistics give an invalid "
                             f"scale ({e}); were they collected on NaN or Inf values?") from None
        if per_channel:
            scale = scale.reshape(-1)
            zero = None if zero is None else zero.reshape(-1)
        return {"scale": scale, "zero": zero}

    def apply(x, state, ctx):
        scale, zero = state["scale"], state["zero"]
        if per_channel:
            if scale.shape[-1] != x.shape[ctx.axis]:
                raise ValueError(
                    f"cast at {ctx.site}:{ctx.role}: {scale.shape[-1]} static channel scales for "
                    f"{x.shape[ctx.axis]} channels (axis {ctx.axis} of shape {x.shape})"
                )
            scale = along_axis(scale, x.ndim, ctx.axis)
            zero = None if zero is None else along_axis(zero, x.ndim, ctx.axis)
        return formats.cast(x, spec, axis=ctx.axis, scale=scale, zero=zero)

    return QuantTransform(init, apply, meta)
