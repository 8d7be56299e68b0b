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


def attention(q, k, v, *, site: str, quant: QuantizerBase | None = None, mask=None, scale: float | None = None):
    """Multi-head attention ``softmax(q·kᵀ·scale [+mask]) · v`` with both matmuls as quantization sites.

    ``q``: (B, Lq, H, D), ``k``/``v``: (B, Lk, H, D); returns (B, Lq, H, D). ``mask`` is a
    boolean array broadcastable to (B, H, Lq, Lk), ``True`` where attention is allowed. The
    matmul sites are ``f"{site}.qk"`` (roles ``q``, ``k``) and ``f"{site}.pv"`` (roles
    ``attn_prob``, ``v``); the softmax scale is applied after q·kᵀ and the softmax runs in
    float32. When ``quant`` transforms none of the four operands, the fused
    ``jax.nn.dot_product_attention`` runs instead (same function, faster on GPU).
    """
    d = q.shape[-1]
    scale = (1.0 / d**0.5) if scale is None else scale
    qk_site, pv_site = f"{site}.qk", f"{site}.pv"
    explicit = quant is not None and (
        quant.quantizes(qk_site, "q") or quant.quantizes(qk_site, "k")
        or quant.quantizes(pv_site, "attn_prob") or quant.quantizes(pv_site, "v")
    )
    if not explicit:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    qh = jnp.swapaxes(q, 1, 2)  # (B, H, Lq, D)
    kt = jnp.transpose(k, (0, 2, 3, 1))  # (B, H, D, Lk)
    vh = jnp.swapaxes(v, 1, 2)  # (B, H, Lk, D)
    logits = qmatmul(qh, kt, site=qk_site, roles=("q", "k"), quant=quant).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = qmatmul(probs, vh, site=pv_site, roles=("attn_prob", "v"), quant=quant)
    return jnp.swapaxes(out, 1, 2)
