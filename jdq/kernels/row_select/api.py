"""``threshold``: the per-row radix threshold of distinct keys, on the implementation ``impl`` selects; ``top_mask`` on it.

:func:`top_mask` is :func:`jdq.quant.outliers.top_mask`'s selection computed from one threshold
per row; ``jdq.models.layers.qlinear`` passes it to the split of a MixDiT linear input on a GPU
(rows of more block maxima than the elementwise rank count takes, 16-bit values;
``JDQ_ROW_SELECT`` chooses: ``auto`` — on a GPU —, ``xla`` or ``kernel``). Implementations
``{"gpu", "xla"}`` behind :func:`~jdq.kernels.op.dispatch`: the Mosaic GPU kernel (:mod:`.gpu`) or
the reference (a sort, :func:`~.ref.threshold`); ``impl="auto"`` takes the kernel only where its
64-row CTAs fill the SMs, the rows counted after ``vmap`` folds its batch into them.
"""

from __future__ import annotations

import functools

import jax

from jdq.kernels.op import dispatch, size_route
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


def _route(impl: str, rows: int) -> str:
    """:func:`~jdq.kernels.op.size_route` by the kernel's CTAs (64 rows each).

    At DiT-XL/2 batch 1 with CFG (512 rows, 8 CTAs) the step took 14.31 ms with the kernel against
    10.89 with the sort (H200); at batch 32 (16384 rows) the kernel was the faster route.
    """
    from jdq.kernels.row_select.gpu import ROWS

    return size_route(impl, rows // ROWS)


@functools.lru_cache(maxsize=None)
def _routed(bits: int, impl: str):
    """The op for static ``(bits, impl)``, routed by the rows it really runs on: under ``vmap`` the batch is folded into the rows."""

    @jax.custom_batching.custom_vmap
    def op(keys, k):
        return dispatch(IMPLEMENTATIONS, _route(impl, keys.shape[0]), keys, k, bits)

    @op.def_vmap
    def rule(axis_size, in_batched, keys, k):
        import jax.numpy as jnp

        keys_b, k_b = in_batched
        if not keys_b:
            keys = jnp.broadcast_to(keys, (axis_size, *keys.shape))
        a, m, n = keys.shape
        if k_b:  # (A,) one k per batch element, or (A, M) one per row
            k = jnp.broadcast_to(k[:, None] if k.ndim == 1 else k, (a, m))
        else:
            k = jnp.broadcast_to(jnp.broadcast_to(k, (m,)), (a, m))
        # one call on A·M rows (k per row): the route sees the rows the device runs, and nested vmaps fold again
        return op(keys.reshape(a * m, n), k.reshape(a * m)).reshape(a, m), True

    return op


@functools.partial(jax.jit, static_argnames=("bits", "impl"))
def threshold(keys, k, *, bits: int, impl: str = "auto"):
    """(M,) int32: per row of distinct non-negative int32 ``keys`` (M, n) the largest ``t < 2**bits`` with ``count(keys >= t) >= k``.

    ``k``: int32, a scalar or one per row (M,). ``impl="auto"`` runs the kernel on a GPU where its
    64-row CTAs fill the SMs (:func:`~jdq.kernels.op.size_route`), counting the rows of every vmapped
    batch, else the sort.
    """
    import jax.numpy as jnp

    if keys.ndim != 2:
        raise ValueError(f"row_select.threshold: keys must be (M, n), got shape {keys.shape}")
    k = jnp.asarray(k, jnp.int32)
    if k.ndim > 1 or (k.ndim == 1 and k.shape[0] != keys.shape[0]):
        raise ValueError(f"row_select.threshold: k must be a scalar or one per row ({keys.shape[0]},), got shape {k.shape}")
    return _routed(bits, impl)(keys, k)


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
