"""Token-mean centering of the key operand (SageAttention's smoothing of K) for low-precision attention.

``softmax(q·(k − k̄)ᵀ) = softmax(q·kᵀ)`` exactly, where ``k̄`` is the mean of ``k`` over the key
tokens: ``q·k̄`` is one constant per row of logits, which the softmax cancels. Keys of diffusion
transformers share a large per-channel offset across tokens (a bias common to every token);
removing it before an FP8 / int8 cast leaves the scale to the part that differs between tokens,
so the cast of ``k`` loses far less (Zhang et al., "SageAttention", 2024, §3.2).

:func:`center_tokens` is a :class:`~jdq.quant.QuantTransform` for role ``k`` of the ``…qk`` site
(``jdq.models.layers.attention`` passes ``kᵀ`` (…, d, L_k) with contraction axis −2, so the token
axis is the last); chained before a cast (``chain(center_tokens(), cast("fp8_e4m3", ...))``) it
gives the fake-quant numerics of an attention kernel that smooths K. On any other operand it
changes the function: use it on ``k`` only.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jdq.quant.transform import Context, QuantTransform, stateless


@dataclasses.dataclass(frozen=True)
class CenterMeta:
    """``meta`` of :func:`center_tokens` (what lowering and the cost model read)."""

    kind: str = "center_tokens"


def token_axis(ndim: int, axis: int) -> int:
    """The token axis of a matmul operand: the one of its last two axes that is not the contraction ``axis``."""
    ax = axis % ndim
    if ax not in (ndim - 1, ndim - 2):
        raise ValueError(f"center_tokens: contraction axis {axis} is not one of the operand's last two axes")
    return ndim - 1 if ax == ndim - 2 else ndim - 2


def center_tokens() -> QuantTransform:
    """Subtract the mean over tokens (float32, then back to the operand's dtype); see the module docstring."""

    def apply(x, ctx: Context):
        xf = x.astype(jnp.float32)
        return (xf - jnp.mean(xf, axis=token_axis(x.ndim, ctx.axis), keepdims=True)).astype(x.dtype)

    return stateless(apply, CenterMeta())


__all__ = ["CenterMeta", "center_tokens", "token_axis"]
