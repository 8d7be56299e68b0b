"""Shared helpers of the kernel tests."""

import jax
import jax.numpy as jnp


def lowers_to_mosaic_gpu(fn, *shapes_dtypes) -> bool:
    """Whether ``jax.jit(fn)`` on abstract arguments cross-lowers (from a CPU) to a Mosaic GPU module."""
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes]
    return "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def pow2(key, shape, lo=-12, hi=-4):
    """Random powers of two (float32): scales that make float epilogues exact."""
    return 2.0 ** jax.random.randint(key, shape, lo, hi).astype(jnp.float32)


def dyadic(key, shape, scale=64):
    """Random multiples of ``1/scale`` (an exactly representable bias)."""
    return jnp.round(jax.random.normal(key, shape) * scale) / scale


def relerr(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
