"""``threshold``: the per-row radix threshold of distinct keys, on the implementation ``impl`` selects; ``top_mask`` on it.

:func:`top_mask` is :func:`jdq.quant.outliers.top_mask`'s selection computed from one threshold
per row; ``jdq.models.layers.qlinear`` passes it to the split of a MixDiT linear input on a GPU
(rows of more block maxima than the elementwise rank count takes, 16-bit values;
``JDQ_ROW_SELECT`` chooses: ``auto`` — on a GPU —, ``xla`` or ``kernel``). Implementations
``{"gpu", "xla"}`` behind :func:`~jdq.kernels.op.dispatch`: the Mosaic GPU kernel (:mod:`.gpu`) or
the reference (a sort, :func:`~.ref.threshold`).
"""

from __future__ import annotations

import functools

import jax

from jdq.kernels.op import dispatch
from jdq.kernels.row_select import ref


def _gpu(keys, k, bits, *, impl):
    if impl not in ("gpu", "gpu_interpret"):
        return None
    from jdq.kernels.row_select.gpu import supports, threshold_gpu

    if supports(*keys.shape, bits):
        return None
    return threshold_gpu(keys, k, bits=bits, interpret=impl == "gpu_interpret")


def _xla(keys, k, bits, *, impl):
    return ref.threshold(keys, k, bits)


#: The implementations of the row threshold (no TPU kernel: the XLA reference there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


@functools.partial(jax.jit, static_argnames=("bits", "impl"))
def threshold(keys, k, *, bits: int, impl: str = "auto"):
    """(M,) int32: per row of distinct non-negative int32 ``keys`` (M, n) the largest ``t < 2**bits`` with ``count(keys >= t) >= k``."""
    if keys.ndim != 2:
        raise ValueError(f"row_select.threshold: keys must be (M, n), got shape {keys.shape}")
    return dispatch(IMPLEMENTATIONS, impl, keys, k, bits)


def top_mask(v, k, impl: str = "auto"):
    """:func:`jdq.quant.outliers.top_mask` of 16-bit float rows ``v`` (…, n) for a scalar ``k``, by :func:`threshold`.

    The keys are the values' order bits then the reversed position (distinct per row, ties to
    the earlier entry), so the ``k`` selected are exactly those at or above the row's threshold.
    """
    import jax.numpy as jnp

    from jdq.quant.outliers import order_key

    key, bits = order_key(v)
    if bits != 16:
        raise ValueError(f"row_select.top_mask: 16-bit float values, got {v.dtype}")
    k = jnp.asarray(k, jnp.int32)
    if k.ndim:
        raise ValueError(f"row_select.top_mask: k must be a scalar, got shape {k.shape}")
    keys, key_bits = ref.unique_keys(key, bits)
    t = threshold(keys.reshape(-1, v.shape[-1]), k, bits=key_bits, impl=impl)
    return (keys >= t.reshape(keys.shape[:-1] + (1,))) & (k > 0)


__all__ = ["IMPLEMENTATIONS", "threshold", "top_mask"]
