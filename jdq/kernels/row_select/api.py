"""``threshold``: the per-row radix threshold of distinct keys, on the implementation ``impl`` selects.

:func:`jdq.quant.outliers.top_mask` calls it for MixDiT's block selection on a GPU (rows of more
block maxima than the elementwise rank count takes, 16-bit values; ``JDQ_ROW_SELECT`` chooses:
``auto`` — on a GPU —, ``xla`` or ``kernel``). Implementations ``{"gpu", "xla"}`` behind
:func:`~jdq.kernels.op.dispatch`: the Mosaic GPU kernel (:mod:`.gpu`) or the reference (a sort,
:func:`~.ref.threshold`).
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


__all__ = ["IMPLEMENTATIONS", "threshold"]
