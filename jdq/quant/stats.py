"""Per-operand statistics and their reduction over sampler steps (below every transform that reads them).

:func:`operand_stats` is what a calibration records per operand and step; :func:`reduce_steps`
collapses the step axis for transforms that do not care about time. Both are re-exported by
:mod:`jdq.quant.calibrate`, the home of calibration; they live here so that the transforms
(:mod:`jdq.quant.regions`, ...) use them without importing the calibration machinery, which itself
calls the transforms' statistic functions.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Stats = Mapping[str, Array]


def reduce_steps(stats: Stats, how: str = "max") -> dict[str, Array]:
    """Collapse the leading step axis of ``stats``: ``max``/``min`` keys by max/min, others by ``how``."""
    out = {}
    for name, value in stats.items():
        value = jnp.asarray(value)
        if name.startswith("min"):
            out[name] = jnp.min(value, axis=0)
        elif name.startswith(("max", "absmax")):
            out[name] = jnp.max(value, axis=0)
        elif how == "max":
            out[name] = jnp.max(value, axis=0)
        elif how == "mean":
            out[name] = jnp.mean(value, axis=0)
        else:
            raise ValueError(f"reduce_steps: unknown how={how!r}; use 'max' or 'mean'")
    return out


def operand_stats(x: Array, axis: int) -> dict[str, Array]:
    """Statistics of one operand: per-index-of-``axis`` and whole-tensor min, max and |max|."""
    x = jnp.asarray(x, jnp.float32)
    axis = axis % x.ndim
    other = tuple(i for i in range(x.ndim) if i != axis)
    return {
        "absmax_channel": jnp.max(jnp.abs(x), axis=other),
        "min_channel": jnp.min(x, axis=other),
        "max_channel": jnp.max(x, axis=other),
        "absmax": jnp.max(jnp.abs(x)),
        "min": jnp.min(x),
        "max": jnp.max(x),
    }
