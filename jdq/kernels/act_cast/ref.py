"""Reference of the fused activation + block cast: ``formats.cast(activate(x), spec, axis=-1)``, the model's own ops.

The reference is what :class:`jdq.models.layers.Mlp` computes unfused: the activation of
:mod:`jdq.kernels.activations` on the bf16 ``x`` (``jax.nn.gelu(x, approximate=True)``: bf16
constants, every operation's result rounded to bf16) and then the plan's cast. XLA keeps those
roundings on a CPU (its compiled HLO); on an H200 a float32 chain rounded once matched the unfused
casts in only 95–99 % of the outputs while it matched XLA's compilation of that chain in all, so
XLA rounds every operation there too. :data:`ACTIVATIONS` holds the same expressions written on
float32 values with a rounding after each operation, the form a kernel evaluates in registers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _to_bf16(v):
    return v.astype(jnp.bfloat16).astype(jnp.float32)


def gelu_tanh_rounded(x):
    """``jax.nn.gelu(x, approximate=True)`` of bf16 values ``x`` (held in float32) operation by operation,
    each result and the constants rounded to bf16, in the order of jax's expression
    ``x * (0.5 * (1 + tanh(c · (x + 0.044715 · x³))))`` with ``x³ = (x · x) · x``."""
    rnd = _to_bf16
    c_cube = np.float32(np.asarray(0.044715, jnp.bfloat16))
    c_scale = np.float32(np.sqrt(2 / np.pi).astype(jnp.bfloat16))
    cube = rnd(rnd(x * x) * x)
    inner = rnd(c_scale * rnd(x + rnd(c_cube * cube)))
    cdf = rnd(0.5 * rnd(1.0 + rnd(jnp.tanh(inner))))
    return rnd(x * cdf)


#: Activations the kernel applies before the cast, as functions of float32 bf16 values (``None``: the cast alone).
ACTIVATIONS = {None: None, "gelu_tanh": gelu_tanh_rounded}


def activation_rounded(x, activation: str | None):
    """:data:`ACTIVATIONS`' ``activation`` of float32 ``x`` (bf16 values), every operation rounded to bf16."""
    fn = ACTIVATIONS[activation]
    return x if fn is None else fn(x)


def supports_cast(spec) -> str | None:
    """``None`` when the kernel casts with ``spec`` (an MX cast with 32- or 16-element blocks, or an
    MX9 / MX6 / MX4 cast with pairs), else why not."""
    kind = getattr(spec, "kind", None)
    if kind not in ("mx", "smx"):
        return f"{getattr(spec, 'name', spec)} is not an MX or MX9 / MX6 / MX4 format"
    if spec.block_size not in (16, 32):
        return f"{spec.name}: block of {spec.block_size} elements (the kernel takes 16 or 32)"
    if kind == "smx" and spec.sub_block_size != 2:
        return f"{spec.name}: sub-blocks of {spec.sub_block_size} (the kernel takes pairs)"
    return None


def check_rows(op: str, x, activation, why: str | None, multiple: int, what: str | None = None):
    """Raise naming ``op`` and the problem unless ``activation`` is known, ``why`` (the cast's refusal) is ``None``,
    ``x`` is bf16 and its last axis a multiple of ``multiple`` (named ``what``): what the activation + cast ops take."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation {activation!r} is not one of {sorted(map(str, ACTIVATIONS))}")
    if why:
        raise ValueError(f"{op}: {why}")
    if x.dtype != jnp.bfloat16:
        raise TypeError(f"{op}: x must be bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % multiple:
        raise ValueError(f"{op}: the last axis of x {x.shape} must be a multiple of {what or multiple}")


def check(x, spec, activation):
    """Raise a ValueError naming the problem unless the op takes ``x`` (bf16, last axis a multiple of 32), ``spec`` and ``activation``."""
    check_rows("act_cast", x, activation, supports_cast(spec), 32)


def reference(x, spec, activation: str | None = None):
    """``formats.cast(activate(x, activation), spec, axis=-1)`` for bf16 ``x``: the unfused MLP's activation and cast."""
    from jdq import formats
    from jdq.kernels.activations import activate

    check(x, spec, activation)
    return formats.cast(activate(x, activation), spec, axis=-1)
