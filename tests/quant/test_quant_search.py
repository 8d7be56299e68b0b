"""Interval search (TQ-DiT / PTQ4ViT): metrics, the vectorised search against a plain loop, toy and real blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq import quant as Q
from jdq.quant.search import interval_candidates, similarity

EPS32 = float(np.finfo(np.float32).eps)


def test_interval_candidates():
    m = interval_candidates()
    assert m.shape == (100,) and m.dtype == np.float32
    np.testing.assert_allclose(m, 0.01 + np.arange(100) * 1.19 / 100, rtol=1e-6)
    assert m[-1] < 1.2
    full = interval_candidates(0.5, 1.5, 4, endpoint=True)
    np.testing.assert_allclose(full, [0.5, 0.75, 1.0, 1.25, 1.5])
    with pytest.raises(ValueError):
        interval_candidates(1.2, 0.01)


def test_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    o, oq, g = (rng.standard_normal((3, 5, 8)).astype(np.float32) for _ in range(3))
    oq[0, 0] = 0.0  # a zero row: the cosine uses eps as torch does
    np.testing.assert_allclose(similarity(o, oq, "mse"), -np.mean((o - oq) ** 2), rtol=1e-6)
    np.testing.assert_allclose(similarity(o, oq, "hessian", g), -np.mean((g * (o - oq)) ** 2), rtol=1e-6)
    norm = lambda a: np.maximum(np.linalg.norm(a, axis=-1), 1e-8)  # noqa: E731
    cos = np.sum(o * oq, -1) / (norm(o) * norm(oq))
    np.testing.assert_allclose(similarity(o, oq, "cosine"), cos.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="needs grad"):
        similarity(o, oq, "hessian")
    with pytest.raises(ValueError, match="unknown metric"):
        similarity(o, oq, "kl")


# ----------------------------------------------------------------------------------------------
# A toy block: one linear layer, per-tensor int4 weight and activation intervals
# ----------------------------------------------------------------------------------------------


def fake(x, scale, fmt, axis):
    return formats.cast(x, fmt, axis, granularity="tensor", scale=scale)


def linear_block(params, x, scales):
    """``Q(x) @ Q(w) + b`` with per-tensor int4 intervals ``scales['weight']``, ``scales['act']``."""
    w, b = params
    if scales is not None:
        x, w = fake(x, scales["act"], "int4", -1), fake(w, scales["weight"], "int4", -2)
    return x @ w + b


def toy(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, (256, 32)) * np.exp(rng.normal(0, 0.5, 32))).astype(np.float32)
    w = (rng.standard_normal((32, 48)) / np.sqrt(32)).astype(np.float32)
    w[3, 5] = 1.5  # one weight outlier, so clipping pays
    b = (0.1 * rng.standard_normal(48)).astype(np.float32)
    params = (jnp.asarray(w), jnp.asarray(b))
    x = jnp.asarray(x)
    init = {"weight": formats.compute_scale(params[0], "int4", -2, granularity="tensor")[0],
            "act": formats.compute_scale(x, "int4", -1, granularity="tensor")[0]}
    grad = jnp.asarray(np.abs(rng.standard_normal((256, 48))).astype(np.float32))
    return params, x, init, grad


def score_bound(metric, target, out, delta, grad):
    """How much the score can move when ``out`` moves by at most ``delta`` elementwise (plus summation rounding)."""
    n = target.size
    d = np.abs(np.asarray(target, np.float64) - np.asarray(out, np.float64))
    if metric == "cosine":  # per row |cos(a, b+δ) − cos(a, b)| ≤ ‖b/‖b‖ − (b+δ)/‖b+δ‖‖ ≤ 2‖δ‖/‖b‖
        rows = np.linalg.norm(np.asarray(out, np.float64), axis=-1)
        return float(np.mean(2 * np.linalg.norm(delta, axis=-1) / rows)) + n * EPS32
    w = 1.0 if grad is None else np.asarray(grad, np.float64) ** 2
    return float(np.mean(w * (2 * d * delta + delta**2)) + n * EPS32 * np.mean(w * d**2))


@pytest.mark.parametrize("metric,batch_size", [("mse", None), ("hessian", 7)])
def test_search_beats_max_scale_and_equals_a_plain_loop(metric, batch_size):
    params, x, init, grad = toy()
    g = grad if metric == "hessian" else None
    res = Q.search_scales(linear_block, params, x, init, grad=g, metric=metric, keys=("weight", "act"),
                          batch_size=batch_size, n=40)
    assert res.scores.shape == (3, 2, 40)
    assert float(res.final_score) > float(res.initial_score)
    target = linear_block(params, x, None)
    np.testing.assert_allclose(res.final_score, similarity(target, linear_block(params, x, res.scales), metric, g),
                               rtol=1e-6)

    # The plain loop: one jitted call per candidate, Python loops over rounds, keys and candidates.
    score = jax.jit(lambda s: similarity(target, linear_block(params, x, s), metric, g))
    out_of = jax.jit(lambda s: linear_block(params, x, s))
    # Rounding bound of either evaluation of an output element: a length-k dot product plus the bias,
    # γ·(|x̂|·|ŵ| + |b|) (the quantized operands are computed elementwise, identically in both); the
    # target is rounded too.
    k = x.shape[-1]
    gamma = (k + 1) * EPS32 / (1 - (k + 1) * EPS32)
    ba = np.abs(np.asarray(params[1], np.float64))
    target_delta = gamma * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(params[0], np.float64)) + ba)

    def delta(cand):
        xq = np.abs(np.asarray(fake(x, cand["act"], "int4", -1), np.float64))
        wq = np.abs(np.asarray(fake(params[0], cand["weight"], "int4", -2), np.float64))
        return gamma * (xq @ wq + ba) + target_delta

    mults = interval_candidates(n=40)
    scales = dict(init)
    for r in range(3):
        for ki, key in enumerate(("weight", "act")):
            row, bounds = [], []
            for m in mults:
                cand = {**scales, key: jnp.float32(m) * init[key]}
                row.append(float(score(cand)))
                bounds.append(score_bound(metric, target, out_of(cand), delta(cand), g))
            row, bounds = np.asarray(row), np.asarray(bounds)
            assert np.all(np.abs(np.asarray(res.scores[r, ki]) - row) <= bounds)
            # the same choice, unless two candidates are closer than the bound (then either is right);
            # the loop then follows the search's choice so that the next rows compare like with like
            best, chosen = int(np.argmax(row)), int(np.argmax(np.asarray(res.scores[r, ki])))
            assert best == chosen or row[best] - row[chosen] <= 2 * bounds.max()
            scales[key] = jnp.float32(mults[chosen]) * init[key]
    for key in scales:
        np.testing.assert_array_equal(np.asarray(res.scales[key]), np.asarray(scales[key]))


def test_cosine_search_beats_max_scale():
    params, x, init, _ = toy(seed=1)
    res = Q.search_scales(linear_block, params, x, init, metric="cosine", batch_size=25)
    assert float(res.final_score) > float(res.initial_score)


def test_search_bad_input():
    params, x, init, grad = toy()
    with pytest.raises(ValueError, match="needs grad"):
        Q.search_scales(linear_block, params, x, init, metric="hessian")
    with pytest.raises(ValueError, match="keys"):
        Q.search_scales(linear_block, params, x, init, metric="mse", keys=("weight", "bias"))
    with pytest.raises(ValueError, match="empty"):
        Q.search_scales(linear_block, params, x, {}, metric="mse")


# ----------------------------------------------------------------------------------------------
# A real block of the embedded model, Hessian-guided with the denoising loss
# ----------------------------------------------------------------------------------------------

BLOCK = 6  # the rest of the network (block 7 and the final layer) is cheap to differentiate
FMTS = {f"blocks.{BLOCK}.mlp.fc1:weight": "int4", f"blocks.{BLOCK}.mlp.fc1:act": "int8"}


class ScaleQuant(Q.QuantizerBase):
    """Per-tensor static int casts of the ``FMTS`` operands, intervals from ``scales``; records the float operands."""

    def __init__(self, scales):
        self.scales = scales
        self.seen = {}

    def quantizes(self, site, role):
        return f"{site}:{role}" in FMTS

    def __call__(self, x, site, role, axis=-1):
        key = f"{site}:{role}"
        if key not in FMTS:
            return x
        self.seen[key] = (x, axis)
        return x if self.scales is None else fake(x, self.scales[key], FMTS[key], axis)


@functools.lru_cache(maxsize=1)
def real_setup():
    """The block, its float input and output, ``g = ∂L/∂O`` of the denoising loss, the model output, max-scales."""
    import animal_calib

    mod = animal_calib.module()
    x_t, t, y, eps = (jnp.asarray(a) for a in animal_calib.calibration_batch(4, seed=2))

    def block(params, inputs, scales):
        h, c = inputs
        return mod.blocks[BLOCK](h, c, quant=ScaleQuant(scales))

    @jax.jit
    def setup(x_t, t, y):  # one compiled call: everything the tests need from the float model
        h, c = animal_calib.block_inputs(mod, x_t, t, y, BLOCK)
        grab = ScaleQuant(None)
        out = mod.blocks[BLOCK](h, c, quant=grab)
        rest = lambda o: animal_calib.tail(mod, o, c, BLOCK + 1)  # noqa: E731
        grad = Q.output_gradient(lambda o: Q.denoising_loss(rest(o), eps), out)
        init = {k: formats.compute_scale(x, FMTS[k], axis, granularity="tensor")[0]
                for k, (x, axis) in grab.seen.items()}
        return (h, c), out, grad, rest(out), init

    inputs, out, grad, pred, init = setup(x_t, t, y)
    return block, inputs, out, grad, pred, init


def test_denoising_gradient_is_defined_where_output_matching_vanishes():
    block, inputs, out, grad, pred, init = real_setup()
    assert grad.shape == out.shape and float(jnp.mean(grad * grad)) > 0
    # a loss comparing the model output z with the float output has zero gradient at z = float output
    # (so, by the chain rule, at every layer's float output): exactly for the squared error ...
    assert float(jnp.max(jnp.abs(Q.output_gradient(lambda z: jnp.mean((z - pred) ** 2), pred)))) == 0.0
    # ... and up to rounding for TQ-DiT's KL over the output's last axis: ∂KL/∂z = softmax(z)·Σp − p,
    # two float32 evaluations of the same softmax (≤ 1) and a sum of 2 of them: |∂KL/∂z| ≤ 8 ε
    kl = lambda z: jnp.sum(jax.nn.softmax(pred) * (jax.nn.log_softmax(pred) - jax.nn.log_softmax(z)))  # noqa: E731
    assert float(jnp.max(jnp.abs(Q.output_gradient(kl, pred)))) <= 8 * EPS32


def test_hessian_search_on_a_real_block_beats_max_scales():
    block, inputs, out, grad, pred, init = real_setup()
    res = Q.search_scales(block, None, inputs, init, grad=grad, metric="hessian", keys=tuple(FMTS), n=20)
    assert float(res.final_score) > float(res.initial_score)
    assert set(res.scales) == set(FMTS)
    # the searched interval clips the 4-bit weight (max-scale is not optimal there)
    assert float(res.scales[f"blocks.{BLOCK}.mlp.fc1:weight"]) < float(init[f"blocks.{BLOCK}.mlp.fc1:weight"])
