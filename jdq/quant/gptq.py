"""GPTQ (Frantar et al., ICLR 2023) on jdq's integer grids: group-wise, act-order, damping, blocked updates.

GPTQ quantizes a linear layer's weight one input channel at a time and spreads each channel's
rounding error over the channels not yet quantized, so that the layer output ``X W`` on calibration
inputs ``X`` changes as little as possible. With ``H = 2 XᵀX`` (any positive multiple gives the
same result) and ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), input channel ``i``
(a row of the ``(in, out)`` weight) is quantized as ``q_i = Q(w_i)`` and the later rows are
updated ``w_k ← w_k − U_ik (w_i − q_i) / U_ii`` for ``k > i``. This equals the Optimal Brain
Quantizer step (``δ = −(w_i − q_i)/[H_F⁻¹]_ii · [H_F⁻¹]_{:,i}``, ``H_F⁻¹`` the inverse Hessian of
the channels still free) with the inverse updated by Gaussian elimination, which the tests use
as the independent reference.

What this implementation does, following the published algorithm and IST-DASLab/gptq (which
Juanerx/Q-DiT uses):

* **damping**: ``H += damp · mean(diag H) · I`` (``damp`` = ``percdamp``, 0.01); a *dead* input
  channel (``H_ii = 0``: never active in calibration) gets ``H_ii = 1`` and a zero weight first;
* **blocked (lazy) updates**: ``block_size`` rows (128) are quantized with in-block updates, then
  the rest of the matrix is updated once with the block's errors (one matmul). The result equals
  the row-by-row algorithm; with groups the block is rounded to a multiple of the group size
  (``g · max(1, block_size // g)``) so that a group never straddles two blocks — IST-DASLab's code
  reads a group's range from weights that miss the current block's updates when it does, making
  its result depend on the block size;
* **groups** (``granularity="group"``): each group of ``g`` consecutive input channels gets its own
  min-max scale per output channel, computed from the *updated* weights when GPTQ reaches the
  group's first channel (dynamic groups, the published scheme); ``"row"`` / ``"tensor"``
  granularities compute the scale once from the original weight, as GPTQ does;
* **act-order** (``act_order=True``): channels are processed in order of decreasing ``H_ii``.
  Group scales are then *static* (from the original weight, ``static_groups``): groups must stay
  consecutive input channels for a ``jdq.formats`` group format to hold the result (dynamic groups
  in permuted order need a per-channel group index, which no jdq format carries).

The grid is exactly the format's (:mod:`jdq.formats.uniform`): symmetric codes
``clamp(round(w·(1/s)), −Q, Q)``, ``s = max|w|·fl32(1/Q)``, or asymmetric ones with a zero point,
round-half-to-even unless the format says ``rounding="away"``. So the result is a weight that
``jdq.formats`` reproduces bit for bit: ``formats.quantize(weight, fmt, axis=-2, scale=scale,
zero=zero)`` gives its codes, ``formats.dequantize`` of them gives ``weight`` back, and a static cast
with ``scale`` leaves it unchanged (float32; in bfloat16 the values are ``dequantize(…, bfloat16)``).
A plan carries it as the model's weight with that static scale, or as the ``QTensor``.

GPTQ runs in float32 (float64 when the weight is float64 under ``jax.enable_x64``), at
``Precision.HIGHEST`` for matmuls (no TF32 on GPUs). ``H`` comes from calibration (the second-moment
accumulator ``Σ xxᵀ`` of the layer's input over all calibration tokens, times 2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jdq import formats
from jdq.formats import uniform

Array = jax.Array

#: Damping as a fraction of the mean diagonal of H (``percdamp`` of IST-DASLab/gptq and Juanerx/Q-DiT).
DAMP = 0.01
#: Rows quantized between two lazy updates (``blocksize`` of IST-DASLab/gptq and Juanerx/Q-DiT).
BLOCK_SIZE = 128
#: Weight granularities GPTQ supports (one scale per tensor, per output channel, per input group).
GRANULARITIES = ("tensor", "row", "group")

_HIGHEST = lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
    """GPTQ's quantized weight (dequantized values, the input's shape and dtype) and its static parameters.

    ``scale`` / ``zero`` have :func:`jdq.formats.compute_scale`'s shape for ``axis=-2``: ``(ceil(in/g), out)``
    for groups, ``(1, out)`` per output channel, ``()`` per tensor; ``zero`` is ``None`` when symmetric.
    """

    weight: Array
    scale: Array
    zero: Array | None


def effective_block_size(block_size: int, group_size: int | None) -> int:
    """Rows per lazy-update block: ``block_size``, rounded to a multiple of the group size (at least one group)."""
    if group_size is None:
        return int(block_size)
    return int(group_size) * max(1, int(block_size) // int(group_size))


def gptq(weight, hessian, fmt="int4", *, damp: float = DAMP, block_size: int = BLOCK_SIZE, act_order: bool = False,
         static_groups: bool | None = None, **options) -> GPTQResult:
    """Quantize an ``(in, out)`` weight to ``fmt`` along its input axis with GPTQ, given ``H = 2XᵀX`` (``(in, in)``).

    ``options`` are the int format's (``granularity``, ``group_size``, ``symmetric``, ``rounding``);
    ``static_groups`` defaults to ``act_order``. Jit-able; outside a trace a Hessian that is not
    positive definite after damping raises ``ValueError``.
    """
    spec = formats.get(fmt, **options)
    if spec.kind != "int":
        raise ValueError(f"gptq: {spec.name!r} is not an integer format; GPTQ needs a uniform int grid (int2 … int8)")
    if spec.granularity not in GRANULARITIES:
        raise ValueError(f"gptq: granularity {spec.granularity!r} is not supported; use one of {GRANULARITIES}")
    w, h = jnp.asarray(weight), jnp.asarray(hessian)
    for name, a in (("weight", w), ("hessian", h)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"gptq: {name} must have a real floating dtype, got {a.dtype}")
    if w.ndim != 2:
        raise ValueError(f"gptq: weight must be 2-D (in, out), got shape {tuple(w.shape)}")
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"gptq: hessian must be ({w.shape[0]}, {w.shape[0]}) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(h.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size must be a positive int, got {block_size!r}")
    static = bool(act_order) if static_groups is None else bool(static_groups)
    grouped = spec.granularity == "group"
    if act_order and grouped and not static:
        raise ValueError("gptq: act_order with dynamic groups puts each group's channels out of order, which no "
                         "jdq.formats group format can hold; use static_groups=True (the default with act_order)")
    block = effective_block_size(block_size, spec.group_size if grouped else None)
    out = _gptq(w, h, jnp.asarray(damp), spec, block, bool(act_order), static and grouped)
    if not isinstance(out.weight, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(out.weight))):
        raise ValueError("gptq: the damped Hessian is not positive definite (Cholesky failed) or the weight is not "
                         f"finite; increase damp (now {damp}) or check the calibration statistics")
    return out


def _round(v, rounding):
    method = lax.RoundingMethod.TO_NEAREST_EVEN if rounding == "even" else lax.RoundingMethod.AWAY_FROM_ZERO
    return lax.round(v, method)


def _quantize_rows(w, scale, zero, spec):
    """Fake-quantize ``w`` with the given scale (and zero): the arithmetic of ``jdq.formats.uniform``."""
    s, r = uniform.reciprocal(scale)
    q = _round(w * r, spec.rounding)
    if spec.symmetric:
        return jnp.clip(q, -spec.qmax, spec.qmax) * s
    return (jnp.clip(q + zero, 0, spec.qmax) - zero) * s


def _row_params(rows, spec, granularity):
    """Min-max (scale, zero) of rows ``(r, out)``: per output channel ``(1, out)`` or per tensor ``(1, 1)``."""
    axes = (0, 1) if granularity == "tensor" else (0,)
    scale, zero = uniform.dynamic_params(rows, spec, axes)
    return scale, (jnp.zeros_like(scale) if zero is None else zero)


def _group_params(w, g, spec):
    """Static (scale, zero) of every group of ``g`` consecutive rows, ``(ceil(in/g), out)`` each."""
    n, m = w.shape
    blocks = jnp.pad(w, ((0, (-n) % g), (0, 0))).reshape(-1, g, m)
    scale, zero = uniform.dynamic_params(blocks, spec, (1,))
    zero = jnp.zeros_like(scale) if zero is None else zero
    return scale[:, 0], zero[:, 0]


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _gptq(weight, hessian, damp, spec, block, act_order, static_groups):
    cdt = jnp.float64 if weight.dtype == jnp.float64 else jnp.float32
    W = weight.astype(cdt)
    H = hessian.astype(cdt)
    n, m = W.shape
    grouped = spec.granularity == "group"
    g = spec.group_size if grouped else n

    if not grouped:  # GPTQ fixes per-channel / per-tensor parameters from the weight as given
        s_fixed, z_fixed = _row_params(W, spec, spec.granularity)
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(cdt))
    W = jnp.where(dead[:, None], 0, W)
    if static_groups:
        s_fixed, z_fixed = _group_params(W, g, spec)

    if act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True)
        W, H = W[perm], H[perm][:, perm]
    else:
        perm = jnp.arange(n)
    H = H + damp.astype(cdt) * jnp.mean(jnp.diag(H)) * jnp.eye(n, dtype=cdt)
    # U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), from one factorisation: with J the reversal,
    # J H J = L̃ L̃ᵀ gives H = R Rᵀ for the upper triangular R = J L̃ J, so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹
    R = jnp.linalg.cholesky(H[::-1, ::-1])[::-1, ::-1]
    U = jnp.triu(jax.scipy.linalg.solve_triangular(R, jnp.eye(n, dtype=cdt), lower=False))

    n_pad = -(-n // block) * block
    pad = n_pad - n  # padded rows: zero weights decoupled by an identity block; they quantize to 0
    W = jnp.pad(W, ((0, pad), (0, 0)))
    U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(n, cdt), jnp.ones(pad, cdt)]))
    group_of = jnp.pad(perm // g, (0, pad))  # static groups: the group of the original channel

    if grouped and not static_groups:
        S = jnp.zeros((n_pad // g, m), cdt)
        Z = jnp.zeros((n_pad // g, m), cdt)
    else:
        S, Z = jnp.atleast_2d(s_fixed), jnp.atleast_2d(z_fixed)

    def block_body(b, carry):
        W, Q, S, Z = carry
        i1 = b * block
        W1 = lax.dynamic_slice_in_dim(W, i1, block, 0)
        U_rows = lax.dynamic_slice_in_dim(U, i1, block, 0)
        U1 = lax.dynamic_slice_in_dim(U_rows, i1, block, 1)

        def column(j, c):
            W1, Q1, E1, S, Z = c
            row = i1 + j
            if grouped and not static_groups:
                # a group's range is read when GPTQ reaches its first row (rows j … j+g-1 of this block,
                # all updated by now); computed every row and kept only there (cheaper to compile than cond)
                s_new, z_new = _row_params(lax.dynamic_slice_in_dim(W1, j - j % g, g, 0), spec, "row")
                first = row % g == 0
                k = row // g
                S = S.at[k].set(jnp.where(first, s_new[0], S[k]))
                Z = Z.at[k].set(jnp.where(first, z_new[0], Z[k]))
                s, z = S[k], Z[k]
            elif static_groups:
                s, z = S[group_of[row]], Z[group_of[row]]
            else:
                s, z = S[0], Z[0]
            w = W1[j]
            q = _quantize_rows(w, s, z, spec)
            err = (w - q) / U1[j, j]
            W1 = W1 - U1[j][:, None] * err[None, :]  # U1[j, :j] = 0: only the rows after j move
            return W1, Q1.at[j].set(q), E1.at[j].set(err), S, Z

        zeros = jnp.zeros((block, m), cdt)
        _, Q1, E1, S, Z = lax.fori_loop(0, block, column, (W1, zeros, zeros, S, Z))
        # U_rows[:, k] = 0 for k < i1; rows of this block get garbage but are never read again
        W = W - jnp.matmul(U_rows.T, E1, precision=_HIGHEST)
        return W, lax.dynamic_update_slice_in_dim(Q, Q1, i1, 0), S, Z

    _, Q, S, Z = lax.fori_loop(0, n_pad // block, block_body, (W, jnp.zeros_like(W), S, Z))
    Q = Q[:n][jnp.argsort(perm)]
    n_groups = -(-n // g)
    if grouped:
        scale, zero = S[:n_groups], Z[:n_groups]
    elif spec.granularity == "row":
        scale, zero = S, Z
    else:
        scale, zero = S.reshape(()), Z.reshape(())
    return GPTQResult(Q.astype(weight.dtype), scale, None if spec.symmetric else zero)
