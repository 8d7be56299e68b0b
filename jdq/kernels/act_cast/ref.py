"""Reference of the fused activation + block cast: ``formats.cast(bf16(act(x)), spec, axis=-1)``.

The activation is computed in float32 from the bf16 input with the constants rounded to the
input's dtype and rounded to bf16 once at the end: what XLA compiles ``jax.nn.gelu(x,
approximate=True)`` of a bf16 ``x`` to on a GPU (its bf16 constants, intermediates kept in float32
— ``xla_allow_excess_precision``). On a CPU, XLA rounds every intermediate to bf16 instead, so the
model's unfused GELU there differs from this function in the last bf16 bit of some elements; the
kernel and this reference are the same function everywhere.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _gelu_tanh(x, dtype):
    """``jax.nn.gelu(x, approximate=True)``'s expression in float32 with its constants rounded to ``dtype``."""
    c_cube = np.float32(np.asarray(0.044715, dtype))
    c_scale = np.float32(np.sqrt(2 / np.pi).astype(dtype))
    cdf = 0.5 * (1.0 + jnp.tanh(c_scale * (x + c_cube * (x * x * x))))
    return x * cdf


#: Activations the kernel applies before the cast (``None``: the cast alone).
ACTIVATIONS = {None: None, "gelu_tanh": _gelu_tanh}


def activation_f32(x, activation: str | None, dtype=jnp.bfloat16):
    """The activation of float32 ``x`` (values of ``dtype``) in float32, the constants rounded to ``dtype``."""
    fn = ACTIVATIONS[activation]
    return x if fn is None else fn(x, dtype)


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


def check(x, spec, activation):
    """Raise a ValueError naming the problem unless the op takes ``x`` (bf16, last axis a multiple of 32), ``spec`` and ``activation``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"act_cast: activation {activation!r} is not one of {sorted(map(str, ACTIVATIONS))}")
    why = supports_cast(spec)
    if why:
        raise ValueError(f"act_cast: {why}")
    if x.dtype != jnp.bfloat16:
        raise TypeError(f"act_cast: x must be bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % 32:
        raise ValueError(f"act_cast: the last axis of x {x.shape} must be a multiple of 32")


def reference(x, spec, activation: str | None = None):
    """``formats.cast(bf16(activation(x)), spec, axis=-1)`` for bf16 ``x`` (the activation in float32, see the module)."""
    from jdq import formats

    check(x, spec, activation)
    y = activation_f32(x.astype(jnp.float32), activation, x.dtype).astype(x.dtype)
    return formats.cast(y, spec, axis=-1)
