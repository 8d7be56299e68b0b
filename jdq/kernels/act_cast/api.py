"""``act_cast``: an activation and an MX / MX9-MX6-MX4 cast along the last axis, on the implementation ``impl`` selects.

The fake-quant (unlowered) path of ``jdq.models.layers.Mlp`` calls it for the input of ``fc2``
when the plan casts it with one block cast the kernel takes (``JDQ_ACT_CAST`` chooses: ``auto``
— on a GPU, bf16 —, ``xla`` or ``kernel``). Implementations ``{"gpu", "xla"}`` behind
:func:`~jdq.kernels.op.dispatch`: the Mosaic GPU kernel (:mod:`.gpu`) or the reference
(:func:`~.ref.reference`).
"""

from __future__ import annotations

import functools
import math

import jax

from jdq.kernels.act_cast import ref
from jdq.kernels.op import dispatch


def _gpu(x, spec, activation, *, impl, config=None):
    if impl not in ("gpu", "gpu_interpret"):
        return None
    from jdq.kernels.act_cast.gpu import Config, act_cast_gpu

    cfg = config or Config()
    x2 = x.reshape(-1, x.shape[-1])
    if cfg.supports(math.prod(x2.shape) // 32):
        return None
    return act_cast_gpu(x2, spec, activation, config=cfg, interpret=impl == "gpu_interpret").reshape(x.shape)


def _xla(x, spec, activation, *, impl, config=None):
    return ref.reference(x, spec, activation)


#: The implementations of the fused activation + cast (no TPU kernel: the XLA reference there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _act_cast(x, spec, activation, impl, config):
    return dispatch(IMPLEMENTATIONS, impl, x, spec, activation, config=config)


@_act_cast.defjvp
def _act_cast_jvp(spec, activation, impl, config, primals, tangents):
    # the reference's tangent: the activation's derivative, the cast straight-through (as formats.cast)
    _, dy = jax.jvp(lambda v: ref.reference(v, spec, activation), primals, tangents)
    return _act_cast(primals[0], spec, activation, impl, config), dy


@functools.partial(jax.jit, static_argnames=("spec", "activation", "impl", "config"))
def act_cast(x, spec, activation: str | None = None, *, impl: str = "auto", config=None):
    """``formats.cast(activate(x, activation), spec, axis=-1)`` of bf16 ``x`` (…, K): the one-pass kernel where it tiles,
    else XLA; differentiable as the reference (the cast straight-through)."""
    ref.check(x, spec, activation)
    return _act_cast(x, spec, activation, impl, config)


__all__ = ["IMPLEMENTATIONS", "act_cast"]
