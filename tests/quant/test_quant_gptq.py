"""GPTQ: equal to an independent column-by-column reference, on jdq's int grids, better than round-to-nearest."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq.quant import gptq
from jdq.quant.gptq import effective_block_size

EPS64 = np.finfo(np.float64).eps
MIN_SCALE = 2.0**-126


# ----------------------------------------------------------------------------------------------
# The reference: the published algorithm in its Optimal-Brain-Quantizer form (numpy float64,
# one input channel at a time, the inverse Hessian of the free channels updated by Gaussian
# elimination; no Cholesky, no blocks).
# ----------------------------------------------------------------------------------------------


def ref_params(rows, bits, symmetric, margins):
    """Min-max scale and zero point per output channel of ``rows`` (jdq.formats.uniform's definition)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return np.abs(rows).max(0) * np.float64(np.float32(1.0 / qmax)), np.zeros(rows.shape[1])
    qmax = 2**bits - 1
    lo, hi = np.minimum(rows.min(0), 0.0), np.maximum(rows.max(0), 0.0)
    scale = (hi - lo) * np.float64(np.float32(1.0 / qmax))
    v = -lo * (1.0 / np.maximum(scale, MIN_SCALE))
    margins.append(np.abs(np.abs(v - np.floor(v)) - 0.5))  # the zero point is rounded too
    return scale, np.rint(v)


def ref_quantize(w, scale, zero, bits, symmetric, margins):
    """Fake-quantize one row; append each element's distance (in code units) from a rounding tie to ``margins``."""
    s = np.maximum(scale, MIN_SCALE)
    v = w * (1.0 / s)
    margins.append(np.abs(np.abs(v - np.floor(v)) - 0.5))
    q = np.rint(v)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(q, -qmax, qmax) * s
    return (np.clip(q + zero, 0, 2**bits - 1) - zero) * s


def ref_gptq(W, H, bits, granularity, group_size, symmetric, damp, act_order, static_groups):
    """Reference GPTQ; returns (quantized weight, scale per group or channel, rounding margins)."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    n, m = W.shape
    margins = []
    if granularity != "group":
        rows = W if granularity == "row" else W.reshape(-1, 1)
        s0, z0 = ref_params(rows, bits, symmetric, margins)
        if granularity == "tensor":
            s0, z0 = np.full(m, s0[0]), np.full(m, z0[0])
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    g = group_size
    if static_groups:
        groups = [ref_params(W[i:i + g], bits, symmetric, margins) for i in range(0, n, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[perm], H[perm][:, perm]
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    scales = {}
    for i in range(n):
        if granularity == "group" and not static_groups:
            if i % g == 0:
                s, z = ref_params(W[i:i + g], bits, symmetric, margins)
                scales[i // g] = s
        elif static_groups:
            s, z = groups[perm[i] // g]
        else:
            s, z = s0, z0
        Q[i] = ref_quantize(W[i], s, z, bits, symmetric, margins)
        d = Hinv[i, i]
        W -= np.outer(Hinv[:, i], (W[i] - Q[i]) / d)
        Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / d
    Q = Q[np.argsort(perm)]
    if granularity == "group":
        scale = np.stack([scales[k] for k in sorted(scales)]) if scales else np.stack([s for s, _ in groups])
    else:
        scale = s0
    return Q, scale, np.concatenate(margins), np.linalg.cond(H)


def problem(n=64, m=24, seed=0, dead=()):
    """A weight and ``H = 2 XᵀX`` from heavy-tailed inputs with spread channel scales (so act-order matters)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, m)) / np.sqrt(n)
    X = rng.standard_t(4, (256, n)) * np.exp(rng.normal(0, 0.7, n))
    X[:, list(dead)] = 0.0
    return W, 2.0 * X.T @ X


CASES = [  # bits, granularity, group, symmetric, act_order, block_size, dead channels
    (4, "group", 16, True, False, 40, ()),     # dynamic groups, 2 per block, 2 blocks
    (4, "group", 12, False, False, 128, ()),   # asymmetric, partial last group, one padded block
    (3, "group", 12, False, True, 24, (5,)),   # act-order + static groups, a dead channel, padding
    (4, "row", None, True, True, 24, ()),      # per output channel, act-order, 3 blocks with padding
    (8, "tensor", None, True, False, 1, (0, 7)),  # no blocking at all
]


@pytest.mark.parametrize("bits,granularity,group,symmetric,act_order,block_size,dead", CASES)
def test_gptq_equals_reference(bits, granularity, group, symmetric, act_order, block_size, dead):
    W, H = problem(dead=dead, seed=bits + block_size)
    opts = dict(granularity=granularity, symmetric=symmetric)
    if group:
        opts["group_size"] = group
    with jax.enable_x64(True):
        got = gptq(jnp.asarray(W), jnp.asarray(H), f"int{bits}", damp=0.01, block_size=block_size,
                   act_order=act_order, **opts)
        got = jax.tree.map(np.asarray, got)
    ref, ref_scale, margins, cond = ref_gptq(W, H, bits, granularity, group, symmetric, 0.01, act_order,
                                           act_order and granularity == "group")
    # Both are float64 evaluations of the same updates (Cholesky + blocks vs. Gaussian elimination);
    # each rounds with relative error <= ~n·ε·κ(H) per update and n updates add up: the pre-rounding
    # values (in code units, |v| <= 2^b) differ by at most tau. No reference value lies within tau of
    # a rounding tie, so every code must agree and the values agree to the scale's relative error.
    n = W.shape[0]
    tau = n * n * EPS64 * cond * 2**bits
    assert tau < 1e-4
    assert margins.min() > tau, "test data puts a value within the error bound of a rounding tie"
    np.testing.assert_allclose(got.weight, ref, rtol=tau, atol=0)
    np.testing.assert_allclose(np.asarray(got.scale).reshape(-1), np.asarray(ref_scale).reshape(-1)[
        : np.asarray(got.scale).size], rtol=tau)
    assert (got.zero is None) == symmetric


def test_effective_block_size():
    assert effective_block_size(128, None) == 128
    assert effective_block_size(128, 32) == 128
    assert effective_block_size(128, 192) == 192
    assert effective_block_size(128, 48) == 96
    assert effective_block_size(1, 16) == 16


def test_bad_input():
    W, H = problem(n=16, m=8)
    with pytest.raises(ValueError, match="not an integer format"):
        gptq(W, H, "mxfp4_e2m1")
    with pytest.raises(ValueError, match="static_groups"):
        gptq(W, H, "int4", granularity="group", group_size=8, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="must be \\(16, 16\\)"):
        gptq(W, H[:8, :8], "int4")
    with pytest.raises(ValueError, match="granularity"):
        gptq(W, H, "int4", granularity="input_channel")
    with pytest.raises(ValueError, match="positive definite"):
        gptq(W.astype(np.float32), -np.eye(16, dtype=np.float32), "int4", damp=0.0)


# ----------------------------------------------------------------------------------------------
# The embedded model: real weights, real calibration activations of the same layer
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def real_inputs():
    import animal_calib

    inputs = animal_calib.layer_inputs(64, seed=0)  # 32 images to calibrate, 32 others to check
    return ({k: v[:32].reshape(-1, v.shape[-1]) for k, v in inputs.items()},
            {k: v[32:].reshape(-1, v.shape[-1]) for k, v in inputs.items()})


SITES = [("blocks.1.attn.qkv", True), ("blocks.1.attn.proj", False), ("blocks.4.mlp.fc1", False),
         ("blocks.6.mlp.fc2", True)]


def relative_error(X, W, Wq):
    ref = X @ W.astype(np.float64)
    return float(np.sum((X @ Wq.astype(np.float64) - ref) ** 2) / np.sum(ref**2))


@pytest.mark.slow
@pytest.mark.parametrize("site,with_act_order", SITES)
def test_gptq_beats_rtn_on_the_embedded_model(site, with_act_order):
    import animal_calib

    (calib, held_out), W = real_inputs(), animal_calib.weight(site)
    X = calib[site].astype(np.float64)
    H = jnp.asarray(2.0 * X.T @ X, jnp.float32)
    opts = dict(granularity="group", group_size=32)
    rtn = np.asarray(formats.cast(jnp.asarray(W), "int4", axis=-2, **opts))
    for act_order in (False, True) if with_act_order else (False,):
        res = gptq(jnp.asarray(W), H, "int4", act_order=act_order, **opts)
        q = np.asarray(res.weight)
        for data in (X, held_out[site].astype(np.float64)):  # calibration tokens and other images
            assert relative_error(data, W, q) < relative_error(data, W, rtn), (site, act_order)

        # the result lies on the format's grid: quantize/dequantize and a static cast reproduce it bit for bit
        qt = formats.quantize(res.weight, "int4", axis=-2, scale=res.scale, zero=res.zero, **opts)
        np.testing.assert_array_equal(np.asarray(formats.dequantize(qt)), q)
        recast = formats.cast(res.weight, "int4", axis=-2, scale=res.scale, zero=res.zero, **opts)
        np.testing.assert_array_equal(np.asarray(recast), q)
        assert np.abs(np.asarray(qt.codes)).max() <= 7


def test_gptq_asymmetric_grid_and_jit():
    import animal_calib

    site = "blocks.2.mlp.fc1"
    (calib, _), W = real_inputs(), animal_calib.weight(site)
    X = calib[site].astype(np.float64)
    H = jnp.asarray(2.0 * X.T @ X, jnp.float32)
    opts = dict(granularity="group", group_size=64, symmetric=False)
    res = jax.jit(lambda w, h: gptq(w, h, "int4", **opts))(jnp.asarray(W), H)
    qt = formats.quantize(res.weight, "int4", axis=-2, scale=res.scale, zero=res.zero, **opts)
    np.testing.assert_array_equal(np.asarray(formats.dequantize(qt)), np.asarray(res.weight))
    assert res.scale.shape == res.zero.shape == (160 // 64 + 1, 640)
    rtn = np.asarray(formats.cast(jnp.asarray(W), "int4", axis=-2, **opts))
    assert relative_error(X, W, np.asarray(res.weight)) < relative_error(X, W, rtn)
