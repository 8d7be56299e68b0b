"""Shared layers. ``qlinear`` and ``qmatmul`` are the ONLY places a jdq model multiplies
matrices, and so the only places quantization meets a model.

Weights are stored in the JAX layout ``(in_features, out_features)``; the contraction axis of a
weight is therefore ``-2`` and that of an activation ``-1``. A ``quant`` argument is ``None``
(the plain model) or a :class:`jdq.quant.QuantizerBase`, called once per operand with the
operand's site path, role and contraction axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdq.quant.transform import QuantizerBase


def qlinear(x, w, b=None, *, site: str, quant: QuantizerBase | None = None, act_role: str = "act"):
    """``x @ w + b`` with the input (role ``act_role``) and weight (role ``weight``) quantized by ``quant``."""
    if quant is not None:
        lowered = quant.lowered(site)
        if lowered is not None:
            # The speed path: a packed weight and a Pallas kernel that quantizes x itself.
            from jdq.kernels import lowered_linear

            return lowered_linear(x, lowered, b, site=site, quant=quant, act_role=act_role)
        x = quant(x, site, act_role, -1)
        w = quant(w, site, "weight", -2)
    y = jnp.matmul(x, w.astype(x.dtype))
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def qmatmul(a, b, *, site: str, roles: tuple[str, str], quant: QuantizerBase | None = None):
    """``a @ b`` over the last two axes (attention matmuls), both operands quantized by ``quant``.

    For q·kᵀ pass ``a = q`` (…, Lq, d), ``b = kᵀ`` (…, d, Lk) and ``roles=("q", "k")``; for p·v
    pass ``a = p`` (…, Lq, Lk), ``b = v`` (…, Lk, d) and ``roles=("attn_prob", "v")``. The
    contraction axis is ``-1`` of ``a`` and ``-2`` of ``b``.
    """
    if quant is not None:
        a = quant(a, site, roles[0], -1)
        b = quant(b, site, roles[1], -2)
    return jnp.matmul(a, b.astype(a.dtype))
