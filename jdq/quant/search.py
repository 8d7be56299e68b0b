"""Interval (scale) search of TQ-DiT / PTQ4ViT, block by block, with MSE, cosine or Hessian-guided scores.

The search (:func:`search_scales`) is generic over a *block function*
``block(params, inputs, scales) -> output``: any piece of a model (one linear layer, an attention
matmul, a whole transformer block) whose quantizers read their intervals from the dict ``scales``
(``scales=None`` must run it in floating point). Each key of ``scales`` is searched in turn over
the candidates ``m · Δ_init`` (``m`` from :func:`interval_candidates`, ``Δ_init`` the key's initial
interval), the other keys held at their current values; :data:`ROUNDS` rounds of this alternate
weights and activations as TQ-DiT does. All candidates of one key are scored in one compiled call
(``jax.lax.map``, optionally ``batch_size`` at a time through ``vmap``); the whole search is one
``jax.jit`` call.

Scores (:func:`similarity`, higher is better), ``O`` the float output, ``Ô`` the quantized one:

* ``"mse"``: ``−mean((O − Ô)²)``;
* ``"cosine"``: mean over rows (the last axis is the feature axis) of ``cos(O, Ô)``;
* ``"hessian"``: ``−mean((g ⊙ (O − Ô))²)`` with ``g = ∂L/∂O`` (PTQ4ViT's Hessian-guided metric: the
  squared gradient is a diagonal Gauss–Newton / Fisher estimate of how much the task loss ``L``
  moves per unit of output error).

**Which L for a diffusion model.** TQ-DiT's released code inherits PTQ4ViT's classification loss,
``KL(softmax(ŷ_q) ‖ softmax(y_fp))`` over the last axis of the model output. For a denoiser that
axis is a pixel's channels, not class logits, and a loss that compares the output with the float
model's own output has its minimum, hence a zero gradient, exactly at the float output — where the
gradients are taken (that code calibrates non-sequentially: every other layer is back in float
during the backward pass), so ``g`` is rounding noise. We use the **denoising loss against the true noise** instead:
``L = mean((ε_θ(x_t, t) − ε)²)`` over the noise channels (:func:`denoising_loss`), with ``x_t``
built from a calibration image ``x_0`` and a known ``ε`` (``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``). It is
the loss the model was trained on, it is well defined at the float weights (its gradient there is
``2 Jᵀ(ε_θ − ε)/N``, not zero), and ``E[g gᵀ] = 4 Jᵀ Cov(ε | x_t) J / N²`` is, up to a constant, the
Gauss–Newton matrix of output matching weighted by the posterior noise covariance, which is what a
quantization error at ``O`` costs. For a learned-σ DiT the variance channels are left out (they get
no gradient). :func:`output_gradient` computes ``g`` by ``jax.vjp`` from any ``O -> L`` function
(the rest of the network after the block, then the loss).

Defaults (``configs/TQ-DiT.py`` of zerohye/TQ-DiT, a PTQ4ViT port): ``alpha = 0.01``,
``beta = 1.2``, ``n = 100`` (``eq_alpha``, ``eq_beta``, ``eq_n``), 3 rounds (``search_round``),
metric ``"hessian"``; candidates are multiples of the *initial* interval in every round (not of the
current one), and ties go to the first (smallest) candidate, as ``torch.argmax`` does. The released
code builds ``n + 1`` multipliers ``α + i(β−α)/n`` but its loop scores only ``i < n`` (``β`` itself is
never tried); :func:`interval_candidates` gives those ``n`` by default (``endpoint=True`` adds β).
Its initial interval is ``max|x| / (2^(b−1) − 0.5)`` on a ``[−2^(b−1), 2^(b−1)−1]`` grid; jdq's
symmetric int formats use ``±(2^(b−1)−1)`` and ``Δ_init = max|x| / (2^(b−1)−1)``
(:func:`jdq.formats.compute_scale`), which the caller passes as ``init_scales``. PTQ4ViT searches
the ``n_V`` output-channel groups of one weight (q, k, v of a fused qkv) in parallel; giving each
its own key here searches them one after another, which chooses the same intervals for the
``"mse"`` and ``"hessian"`` scores (each group only changes its own output slice).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Score names :func:`similarity` accepts.
METRICS = ("mse", "cosine", "hessian")
#: Smallest candidate multiplier (TQ-DiT ``eq_alpha``).
ALPHA = 0.01
#: Largest candidate multiplier (TQ-DiT ``eq_beta``).
BETA = 1.2
#: Number of candidate steps (TQ-DiT ``eq_n``).
NUM = 100
#: Rounds of alternating weight / activation search (TQ-DiT ``search_round``).
ROUNDS = 3
#: ``eps`` of the cosine score, as ``torch.nn.functional.cosine_similarity``.
COSINE_EPS = 1e-8


def interval_candidates(alpha: float = ALPHA, beta: float = BETA, n: int = NUM, endpoint: bool = False) -> np.ndarray:
    """Multipliers ``α + i(β−α)/n`` of the initial interval, ``i = 0 … n−1`` (``… n`` with ``endpoint``)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"interval_candidates: n must be a positive int, got {n!r}")
    if not 0 < alpha < beta:
        raise ValueError(f"interval_candidates: need 0 < alpha < beta, got alpha={alpha!r}, beta={beta!r}")
    i = np.arange(n + 1 if endpoint else n, dtype=np.float64)
    return (alpha + i * (beta - alpha) / n).astype(np.float32)


def similarity(target: Array, output: Array, metric: str = "mse", grad: Array | None = None) -> Array:
    """Score of ``output`` against the float ``target`` (higher is better): −MSE, cosine or −E[(g ⊙ (O − Ô))²]."""
    if metric not in METRICS:
        raise ValueError(f"similarity: unknown metric {metric!r}; known: {METRICS}")
    target = jnp.asarray(target, jnp.float32)
    output = jnp.asarray(output, jnp.float32)
    if metric == "cosine":
        dot = jnp.sum(target * output, axis=-1)
        norms = (jnp.maximum(jnp.linalg.norm(target, axis=-1), COSINE_EPS)
                 * jnp.maximum(jnp.linalg.norm(output, axis=-1), COSINE_EPS))
        return jnp.mean(dot / norms)
    diff = target - output
    if metric == "hessian":
        if grad is None:
            raise ValueError("similarity: metric='hessian' needs grad (∂L/∂O, see output_gradient)")
        diff = jnp.asarray(grad, jnp.float32) * diff
    return -jnp.mean(diff * diff)


def denoising_loss(pred: Array, noise: Array) -> Array:
    """Mean squared error of the noise channels ``pred[..., :C]`` against the true noise (``C = noise.shape[-1]``)."""
    c = noise.shape[-1]
    if pred.shape[:-1] != noise.shape[:-1] or pred.shape[-1] < c:
        raise ValueError(f"denoising_loss: prediction {tuple(pred.shape)} does not hold noise of shape "
                         f"{tuple(noise.shape)} in its first channels")
    err = jnp.asarray(pred[..., :c], jnp.float32) - jnp.asarray(noise, jnp.float32)
    return jnp.mean(err * err)


def output_gradient(loss_of_output: Callable[[Array], Array], output: Array) -> Array:
    """``g = ∂L/∂O`` of a scalar loss ``loss_of_output(O)`` at ``O = output``, by ``jax.vjp``."""
    value, vjp = jax.vjp(loss_of_output, output)
    if jnp.shape(value) != ():
        raise ValueError(f"output_gradient: the loss must be a scalar, got shape {jnp.shape(value)}")
    (g,) = vjp(jnp.ones_like(value))
    return g


class SearchResult(NamedTuple):
    """Result of :func:`search_scales`: the searched intervals and every score computed on the way.

    ``scores[r, k, i]`` is the score of candidate ``multipliers[i]`` for ``keys[k]`` in round ``r``
    (the other keys at their values at that moment); ``initial_score`` / ``final_score`` are the
    scores of ``init_scales`` and of ``scales``.
    """

    scales: dict[str, Array]
    scores: Array
    initial_score: Array
    final_score: Array
    multipliers: Array


def search_scales(block: Callable[[Any, Any, Mapping[str, Array] | None], Array], params, inputs,
                  init_scales: Mapping[str, Array], *, target: Array | None = None, grad: Array | None = None,
                  metric: str = "hessian", keys: Sequence[str] | None = None, rounds: int = ROUNDS,
                  alpha: float = ALPHA, beta: float = BETA, n: int = NUM, endpoint: bool = False,
                  batch_size: int | None = None) -> SearchResult:
    """Search each interval of ``init_scales`` over ``m · Δ_init`` in turn, ``rounds`` times (TQ-DiT); one jit call.

    ``keys`` gives the search order (default: the dict's order; put a layer's weight before its
    activation, as TQ-DiT does); keys left out keep their initial value. ``target`` defaults to
    ``block(params, inputs, None)``; ``grad`` (same shape as the output) is required by
    ``metric="hessian"``. ``batch_size`` candidates are scored at once (``None``: one at a time,
    the least memory). ``block`` is static under jit: pass the same function to reuse the compilation.
    """
    if metric not in METRICS:
        raise ValueError(f"search_scales: unknown metric {metric!r}; known: {METRICS}")
    if metric == "hessian" and grad is None:
        raise ValueError("search_scales: metric='hessian' needs grad=∂L/∂O (see output_gradient)")
    if not init_scales:
        raise ValueError("search_scales: init_scales is empty; nothing to search")
    keys = tuple(init_scales) if keys is None else tuple(keys)
    unknown = [k for k in keys if k not in init_scales]
    if unknown or len(set(keys)) != len(keys):
        raise ValueError(f"search_scales: keys must be distinct keys of init_scales; unknown {unknown}, "
                         f"got {list(keys)}")
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"search_scales: rounds must be a positive int, got {rounds!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"search_scales: batch_size must be None or a positive int, got {batch_size!r}")
    mults = jnp.asarray(interval_candidates(alpha, beta, n, endpoint))
    init = {k: jnp.asarray(v, jnp.float32) for k, v in init_scales.items()}
    return _search(block, keys, metric, int(rounds), batch_size, params, inputs, init, target, grad, mults)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _search(block, keys, metric, rounds, batch_size, params, inputs, init, target, grad, mults):
    if target is None:
        target = block(params, inputs, None)

    def score(scales):
        return similarity(target, block(params, inputs, scales), metric, grad)

    def one_round(scales, _):
        rows = []
        for key in keys:
            def candidate(m, key=key, scales=scales):
                return score({**scales, key: m * init[key]})

            s = jax.lax.map(candidate, mults, batch_size=batch_size)
            scales = {**scales, key: mults[jnp.argmax(s)] * init[key]}
            rows.append(s)
        return scales, jnp.stack(rows)

    final, table = jax.lax.scan(one_round, init, None, length=rounds)
    return SearchResult(final, table, score(init), score(final), mults)
