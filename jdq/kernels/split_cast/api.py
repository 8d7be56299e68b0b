"""``split_cast``: MixDiT's outlier split of a linear input (an optional activation first) in one kernel, on the implementation ``impl`` selects.

With ``JDQ_SPLIT_CAST=kernel`` the fake-quant (unlowered) path of ``jdq.models.layers.qlinear``
calls it for a bf16 linear input whose plan transform is a block outlier split the kernel takes
(:func:`~.ref.unsupported`), and ``jdq.models.layers.Mlp`` for fc2's input with the MLP's GELU
fused. By default (``auto`` / ``xla``) the model keeps XLA's block maxima and cast around the
``jdq.kernels.row_select`` selection, measured faster on an H200 (0.088 against 0.104 ms for a
1152-wide input at 64 × 256 tokens, 0.404 against 0.638 for fc2's GELU + split; RESULTS §3
"Thirteenth round"): the kernel holds a row block's keys in shared memory, so one or two CTAs of
one warpgroup fit an SM and its arithmetic has too few warps to hide latency. Implementations
``{"gpu", "xla"}`` behind :func:`~jdq.kernels.op.dispatch`: the Mosaic GPU kernel (:mod:`.gpu`) or
the reference (:func:`~.ref.reference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdq.kernels.op import dispatch
from jdq.kernels.split_cast import ref


def _gpu(x, ratio, meta, activation, *, impl):
    if impl not in ("gpu", "gpu_interpret"):
        return None
    from jdq.kernels.split_cast.gpu import split_cast_gpu, supports
    from jdq.quant.outliers import outlier_count

    x2 = x.reshape(-1, x.shape[-1])
    if supports(*x2.shape, meta.block_size):
        return None
    k = outlier_count(ratio, x.shape[-1] // meta.block_size)
    return split_cast_gpu(x2, k, meta, activation, interpret=impl == "gpu_interpret").reshape(x.shape)


def _xla(x, ratio, meta, activation, *, impl):
    return ref.reference(x, ratio, meta, activation)


#: The implementations of the split cast (no TPU kernel: the XLA reference there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _split_cast(x, ratio, meta, activation, impl):
    return dispatch(IMPLEMENTATIONS, impl, x, ratio, meta, activation)


@_split_cast.defjvp
def _split_cast_jvp(meta, activation, impl, primals, tangents):
    # the reference's tangent: the activation's derivative, the cast straight-through; none for the ratio
    x, ratio = primals
    _, dy = jax.jvp(lambda v: ref.reference(v, ratio, meta, activation), (x,), tangents[:1])
    return _split_cast(x, ratio, meta, activation, impl), dy


@functools.partial(jax.jit, static_argnames=("meta", "activation", "impl"))
def split_cast(x, ratio, meta, activation: str | None = None, *, impl: str = "auto"):
    """``split_dynamic(meta, activate(x, activation), {"ratio": ratio}, -1)`` of bf16 ``x`` (…, K): the one kernel where it
    tiles (rows a multiple of 64), else XLA; differentiable as the reference (the cast straight-through).

    ``meta``: the :class:`~jdq.quant.outliers.OutlierMeta` of a block split per row whose formats
    differ only in width (MX9 / MX6); ``ratio``: its state (float32, may be traced or vmapped).
    """
    ref.check(x, meta, activation)
    return _split_cast(x, jnp.asarray(ratio, jnp.float32), meta, activation, impl)


__all__ = ["IMPLEMENTATIONS", "split_cast"]
