"""Shared helpers of the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np


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


def assert_within_reordering_bound(got, want, abs_terms_sum, n_terms: int):
    """``got`` and ``want`` are float32 sums of the same ``n_terms`` terms in two summation orders.

    Any order of a float32 sum lies within ``γ_n · Σ|terms|`` (``γ_n = n·u / (1 − n·u)``, ``u = 2⁻²⁴``)
    of the exact sum, so two orders differ by at most twice that: the bound for a float reduction
    whose order a compiler or backend chooses (Higham, Accuracy and Stability, §4.2).
    """
    u = 2.0**-24
    gamma = n_terms * u / (1 - n_terms * u)
    bound = 2 * gamma * np.asarray(abs_terms_sum, np.float64)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    worst = np.max(diff - bound)
    assert worst <= 0, f"{int(np.sum(diff > bound))} elements exceed the reordering bound (worst excess {worst:.3g})"
