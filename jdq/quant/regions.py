"""Multi-region quantizers of TQ-DiT (MRQ): post-softmax two-region and post-GELU two-sided.

Both follow docs/methods.md §4 and the released TQ-DiT code (a PTQ4ViT port), with ``q = 2^(b-1)``
levels per region (the most significant bit of a ``b``-bit code selects the region):

* **post-softmax** (:func:`softmax_two_region`), for attention probabilities ``A ∈ [0, 1]`` and a
  split ``s`` (a power of two, ``s ∈ {2^0 … 2^-19}``): ``[0, s)`` uses step ``Δ_lo = s/(q-1)``,
  ``[s, 1]`` uses step ``1/(q-1)``. Two modes:

  - ``"regions"`` (default): each value is quantized in the one region it lies in
    (``A < s`` → low region), the scheme the paper describes;
  - ``"tqdit"``: the released code verbatim,
    ``round(clamp(A, s, 1)(q-1))/(q-1) + round(clamp(A, 0, s)/Δ_lo)·Δ_lo`` (each term clamped to
    codes ``[0, q-1]``). Note that this *sums* both terms, so every value also gets the other
    region's clamp value (``≈ s``) added; we reproduce it for fidelity and flag it here.

* **post-GELU** (:func:`post_gelu_two_sided`), for the input of the second MLP linear:
  ``Q(x) = clamp(round(x/Δ+), 0, q-1)·Δ+ + clamp(round(x/Δ-), -q, 0)·Δ-`` with
  ``Δ- = 0.16997124254703522 / q`` fixed (GELU's minimum is ≈ -0.17) and ``Δ+`` calibrated
  (TQ-DiT initialises ``Δ+ = max(x) / (q - 0.5)`` and then searches; see :func:`search_delta_pos`).

Rounding is round-half-to-even (``torch.round`` and ``jnp.round`` agree), computed in float32
and returned in the input dtype, with a straight-through gradient (identity). Both quantizers
have static state (``{"split": s}`` / ``{"delta_pos": Δ+}``, float32 scalars), so they can be
time-grouped (TQ-DiT TGQ groups the post-softmax quantizer) and swept with ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.stats import reduce_steps
from jdq.quant.transform import QuantTransform

#: Negative step numerator of the post-GELU quantizer (TQ-DiT / PTQ4ViT constant, |min GELU|).
GELU_NEG_RANGE = 0.16997124254703522
#: Candidate splits of the post-softmax quantizer, 2^0 … 2^-19 (TQ-DiT).
SPLIT_CANDIDATES = tuple(2.0**-k for k in range(20))
#: Candidate multipliers of Δ+ = max/(q-0.5) in the post-GELU search: 0.01 + i·(1.2-0.01)/100, i = 0..100.
DELTA_POS_MULTIPLIERS = tuple(0.01 + i * (1.2 - 0.01) / 100 for i in range(101))

_MODES = ("regions", "tqdit")


@dataclasses.dataclass(frozen=True)
class RegionMeta:
    """``meta`` of a multi-region quantizer: which one, its bit width and mode."""

    kind: ClassVar[str] = "multi_region"
    quantizer: str  # "softmax_two_region" | "post_gelu_two_sided"
    bits: int
    mode: str = "regions"


def _check_bits(bits, who):
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{who}: bits must be an int in [2, 16], got {bits!r}")
    return 2 ** (bits - 1)


def _ste(x, xq):
    """Value ``xq`` with the gradient of the identity (straight-through estimator).

    ``(x - sg(x)) + sg(xq)`` is exactly ``xq`` in any dtype (``x + sg(xq - x)`` may round in bf16).
    """
    return (x - jax.lax.stop_gradient(x)) + jax.lax.stop_gradient(xq)


def two_region_quantize(x, split, bits: int = 8, mode: str = "regions"):
    """Post-softmax two-region fake quantization of ``x`` (values in ``[0, 1]``) at split ``split``."""
    q = _check_bits(bits, "two_region_quantize")
    if mode not in _MODES:
        raise ValueError(f"two_region_quantize: mode must be one of {_MODES}, got {mode!r}")
    xf = jnp.asarray(x, jnp.float32)
    s = jnp.asarray(split, jnp.float32)
    lo_step = s / (q - 1)
    if mode == "regions":
        low = jnp.clip(jnp.round(xf / lo_step), 0, q - 1) * lo_step
        high = jnp.clip(jnp.round(xf * (q - 1)), 0, q - 1) / (q - 1)
        out = jnp.where(xf < s, low, high)
    else:
        high = jnp.clip(jnp.round(jnp.clip(xf, s, 1.0) * (q - 1)), 0, q - 1) / (q - 1)
        low = jnp.clip(jnp.round(jnp.clip(xf, 0.0, s) / lo_step), 0, q - 1) * lo_step
        out = high + low
    return _ste(x, out.astype(jnp.result_type(x)))


def two_sided_quantize(x, delta_pos, bits: int = 8):
    """Post-GELU two-sided fake quantization: step ``delta_pos`` above zero, ``0.16997…/2^(b-1)`` below."""
    q = _check_bits(bits, "two_sided_quantize")
    xf = jnp.asarray(x, jnp.float32)
    dp = jnp.asarray(delta_pos, jnp.float32)
    dn = GELU_NEG_RANGE / q
    out = jnp.clip(jnp.round(xf / dp), 0, q - 1) * dp + jnp.clip(jnp.round(xf / dn), -q, 0) * dn
    return _ste(x, out.astype(jnp.result_type(x)))


@functools.partial(jax.jit, static_argnames=("bits", "mode", "candidates"))
def split_errors(x, bits: int = 8, mode: str = "regions", candidates=SPLIT_CANDIDATES):
    """Mean squared error of :func:`two_region_quantize` on ``x`` for each candidate split (shape ``[K]``)."""
    xf = jnp.asarray(x, jnp.float32)
    # lax.map: one candidate at a time, so memory stays at one copy of x
    return jax.lax.map(lambda s: jnp.mean((two_region_quantize(xf, s, bits, mode) - xf) ** 2),
                       jnp.asarray(candidates, jnp.float32))


def search_split(x, bits: int = 8, mode: str = "regions", candidates=SPLIT_CANDIDATES) -> jax.Array:
    """The candidate split with the smallest mean squared error on samples ``x`` (MSE objective)."""
    candidates = tuple(float(c) for c in candidates)
    return jnp.asarray(candidates, jnp.float32)[jnp.argmin(split_errors(x, bits, mode, candidates))]


def split_stats(bits: int = 8, mode: str = "regions", candidates=SPLIT_CANDIDATES):
    """A ``stat_fn`` for :func:`jdq.quant.collect_stats` adding ``"split_mse"`` (one MSE per candidate).

    ``init`` of :func:`softmax_two_region` averages it over the calibration steps and picks the
    smallest; use it with ``roles=("attn_prob",)``.
    """
    from jdq.quant.stats import operand_stats

    candidates = tuple(float(c) for c in candidates)

    def stat_fn(x, axis):
        return dict(operand_stats(x, axis), split_mse=split_errors(x, bits, mode, candidates))

    return stat_fn


def search_delta_pos(x, bits: int = 8, multipliers=DELTA_POS_MULTIPLIERS) -> jax.Array:
    """Δ+ minimising the mean squared error of :func:`two_sided_quantize` on samples ``x``.

    Candidates are ``m · max(x) / (q - 0.5)`` for ``m`` in ``multipliers`` (TQ-DiT's grid;
    TQ-DiT scores them with a Hessian-weighted output error, ``jdq.quant.search`` does that).
    """
    _check_bits(bits, "search_delta_pos")
    return _search_delta_pos(jnp.asarray(x, jnp.float32), bits, tuple(float(m) for m in multipliers))


@functools.partial(jax.jit, static_argnames=("bits", "multipliers"))
def _search_delta_pos(xf, bits, multipliers):
    cands = jnp.asarray(multipliers, jnp.float32) * (jnp.max(xf) / (2 ** (bits - 1) - 0.5))
    errs = jax.lax.map(lambda c: jnp.mean((two_sided_quantize(xf, c, bits) - xf) ** 2), cands)
    return cands[jnp.argmin(errs)]


def softmax_two_region(bits: int = 8, split: float | None = None, mode: str = "regions",
                       candidates=SPLIT_CANDIDATES) -> QuantTransform:
    """TQ-DiT MRQ for attention probabilities: two uniform regions ``[0, s)`` and ``[s, 1]``, b−1 bits each.

    State ``{"split": s}``. ``init`` uses ``split`` when given, else the statistic
    ``"split_mse"`` (from :func:`split_stats`, averaged over steps) to pick the best candidate.
    """
    _check_bits(bits, "softmax_two_region")
    if mode not in _MODES:
        raise ValueError(f"softmax_two_region: mode must be one of {_MODES}, got {mode!r}")
    if split is not None and not 0.0 < float(split) <= 1.0:
        raise ValueError(f"softmax_two_region: split must lie in (0, 1], got {split!r}")
    cands = jnp.asarray(candidates, jnp.float32)

    def init(stats):
        if split is not None:
            return {"split": jnp.float32(split)}
        mse = jnp.asarray(stats["split_mse"], jnp.float32)
        if mse.shape[-1] != cands.shape[0]:
            raise ValueError(f"softmax_two_region: split_mse has {mse.shape[-1]} candidates, expected {cands.shape[0]}")
        mse = mse.reshape(-1, cands.shape[0]).mean(axis=0)
        return {"split": cands[jnp.argmin(mse)]}

    def apply(x, state, ctx):
        return two_region_quantize(x, state["split"], bits, mode)

    return QuantTransform(init, apply, RegionMeta("softmax_two_region", bits, mode))


def post_gelu_two_sided(bits: int = 8, delta_pos: float | None = None) -> QuantTransform:
    """TQ-DiT MRQ for post-GELU activations: Δ+ above zero (calibrated), Δ− = 0.16997124/2^(b−1) below.

    State ``{"delta_pos": Δ+}``. ``init`` uses ``delta_pos`` when given, else TQ-DiT's
    initialisation ``max(x) / (2^(b-1) - 0.5)`` from the statistic ``"max"`` (max over steps).
    """
    q = _check_bits(bits, "post_gelu_two_sided")
    if delta_pos is not None and not float(delta_pos) > 0:
        raise ValueError(f"post_gelu_two_sided: delta_pos must be positive, got {delta_pos!r}")

    def init(stats):
        if delta_pos is not None:
            return {"delta_pos": jnp.float32(delta_pos)}
        hi = reduce_steps({"max": stats["max"]})["max"]
        hi = jnp.maximum(jnp.asarray(hi, jnp.float32), np.float32(np.finfo(np.float32).tiny))
        return {"delta_pos": hi / (q - 0.5)}

    def apply(x, state, ctx):
        return two_sided_quantize(x, state["delta_pos"], bits)

    return QuantTransform(init, apply, RegionMeta("post_gelu_two_sided", bits, "regions"))
