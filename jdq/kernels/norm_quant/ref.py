"""LayerNorm + adaLN modulation + per-token quantization, pure jnp reference.

The producer of a DiT block's ``qkv`` and ``fc1`` inputs is ``modulate(layer_norm(x), shift,
scale)`` (:func:`jdq.models.layers.layer_norm`, :func:`jdq.models.layers.modulate`), which a W8A8
site then quantizes per token. :func:`norm_quantize_rows` computes all three at once:

* ``x`` (M, K) rows, grouped by sample: row ``r`` belongs to sample ``r // group_rows``
  (``group_rows`` = tokens per sample), ``shift`` / ``scale`` (M / group_rows, K);
* ``h = ((x − mean) · rsqrt(var + eps)) · (1 + scale) + shift`` in float32 (biased variance, two
  passes, as ``layer_norm``) and rounded **once** to ``x``'s dtype — the tensor the unfused path
  materializes and quantizes. The unfused path, written in ``x``'s dtype, may also round the
  LayerNorm output and ``1 + scale`` to bf16; XLA elides such roundings inside a fusion when it
  allows excess precision (its default), and whether it does depends on the fusion. So for bf16
  activations the two agree to about one bf16 rounding of ``h``; for float32, to float32 rounding;
* codes and float32 scales of ``h`` exactly as :func:`jdq.kernels.token_quant.ref.quantize_rows`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jdq.kernels.token_quant.ref import check_format, quantize_rows


def check_shapes(x, shift, scale, group_rows: int):
    """(M, K, groups) of valid operands, else a ValueError naming the mismatch."""
    if x.ndim != 2:
        raise ValueError(f"norm_quant: x must be 2-D (M, K), got shape {x.shape}")
    m, k = x.shape
    if group_rows <= 0 or m % group_rows:
        raise ValueError(f"norm_quant: M={m} rows are not a whole number of groups of {group_rows} rows")
    g = m // group_rows
    if shift.shape != (g, k) or scale.shape != (g, k):
        raise ValueError(f"norm_quant: shift {shift.shape} / scale {scale.shape} must be ({g}, {k}): one row per sample")
    return m, k, g


def modulation_factors(shift, scale):
    """``1 + scale`` and ``shift`` in float32, stacked (G, 2, K): the modulation rows the kernel reads."""
    return jnp.stack([1 + scale.astype(jnp.float32), shift.astype(jnp.float32)], axis=1)


def modulated_norm(x, shift, scale, group_rows: int, eps: float = 1e-6):
    """``h`` of the module docstring, (M, K) in ``x``'s dtype."""
    m, k, g = check_shapes(x, shift, scale, group_rows)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + jnp.float32(eps))
    ab = jnp.repeat(modulation_factors(shift, scale), group_rows, axis=0)  # (M, 2, K)
    return (y * ab[:, 0] + ab[:, 1]).astype(x.dtype)


def norm_quantize_rows(x, shift, scale, group_rows: int, eps: float = 1e-6, fmt: str = "int8"):
    """Per-token codes (M, K) and float32 scales (M,) of :func:`modulated_norm` (see the module docstring)."""
    check_format(fmt)
    return quantize_rows(modulated_norm(x, shift, scale, group_rows, eps), fmt)


__all__ = ["check_shapes", "modulated_norm", "modulation_factors", "norm_quantize_rows"]
