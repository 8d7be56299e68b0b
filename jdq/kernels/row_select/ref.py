"""Per-row radix threshold of distinct integer keys: the reference.

MixDiT's top-k block selection (:func:`jdq.quant.outliers.top_mask`) ranks each row's block
maxima. With ties broken by position folded into the keys (:func:`unique_keys`: the value's order
bits, then the reversed position), every key of a row is distinct and the ``k`` selected entries
are exactly those at or above the row's :func:`threshold`: the largest ``t`` with
``count(keys >= t) >= k``. That is the ``k``-th largest key for ``1 <= k <= n``, ``0`` for
``k > n`` (everything is selected) and ``2**bits - 1`` for ``k <= 0`` (the caller masks ``k > 0``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

#: Bits of a key the kernel takes (non-negative int32).
MAX_BITS = 31


def unique_keys(order_key, value_bits: int):
    """``(order_key << p) | (n - 1 - position)`` as int32 (``p`` position bits): distinct per row, ties to the earlier.

    ``order_key``: (..., n) non-negative integers below ``2**value_bits`` in the values' order.
    Returns ``(keys, bits)``; raises when the keys would not fit :data:`MAX_BITS`.
    """
    n = order_key.shape[-1]
    pos_bits = max(int(n - 1).bit_length(), 1)
    bits = value_bits + pos_bits
    if bits > MAX_BITS:
        raise ValueError(f"unique_keys: {value_bits} value bits and {pos_bits} position bits exceed {MAX_BITS}")
    later = (n - 1) - lax.broadcasted_iota(jnp.int32, order_key.shape, order_key.ndim - 1)
    return (order_key.astype(jnp.int32) << pos_bits) | later, bits


def threshold(keys, k, bits: int):
    """(M,) int32: per row of the distinct non-negative ``keys`` (M, n), the largest ``t < 2**bits`` with ``count(keys >= t) >= k``."""
    m, n = keys.shape
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (m,))
    desc = -jnp.sort(-keys, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, n - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(k <= 0, jnp.int32((1 << bits) - 1), jnp.where(k > n, jnp.int32(0), kth))


__all__ = ["MAX_BITS", "threshold", "unique_keys"]
