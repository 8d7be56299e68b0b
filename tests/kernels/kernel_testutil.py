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


U32 = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``: the relative error bound of an ``n``-term float32 sum or product chain."""
    return n * U32 / (1 - n * U32)


def normalization_bound(x, axes, scale=None, bias=None, *, eps: float = 0.0, center: bool = True, rsqrt_ulps: int = 4):
    """Bound on ``|a − b|`` for two float32 implementations of ``(x − μ)/√(σ² + eps)·scale + bias``.

    ``μ``, ``σ²`` (biased) are over ``axes`` (``center=False``: RMS norm, ``μ = 0``). First-order
    error analysis of one implementation, any summation order (Higham §3–4): the mean is within
    ``e_μ = (γ_n + u)·mean|x|``; the variance, a sum of non-negative terms whose inputs are off by
    ``e_μ``, within relative ``γ_n + 4u + 2e_μ/√(σ² + eps)``; ``rsqrt`` adds ``rsqrt_ulps`` ulps (XLA's and
    PyTorch's differ by a few), the normalised value ``z`` inherits half the variance's relative error
    plus ``e_μ/√(σ² + eps)``, and the affine step one rounding each. Two implementations differ by at
    most the sum of their bounds. ``x``, ``scale``, ``bias`` broadcast as in the layer.
    """
    u = U32
    x = np.asarray(x, np.float64)
    axes = tuple(a % x.ndim for a in axes)
    n = int(np.prod([x.shape[a] for a in axes]))
    g = gamma(n)
    mu = x.mean(axes, keepdims=True) if center else 0.0
    d = x - mu
    sig = np.sqrt((d * d).mean(axes, keepdims=True) + eps)
    e_mu = (g + u) * np.abs(x).mean(axes, keepdims=True) if center else 0.0
    rel_var = g + 4 * u + 2 * e_mu / sig
    z = d / sig
    dz = np.abs(z) * (rel_var / 2 + (rsqrt_ulps + 1) * u) + (e_mu + u * np.abs(d)) / sig
    s = np.ones(()) if scale is None else np.asarray(scale, np.float64)
    b = np.zeros(()) if bias is None else np.asarray(bias, np.float64)
    y = z * s + b
    return 2 * (dz * np.abs(s) + u * np.abs(z * s) + u * np.abs(y))
