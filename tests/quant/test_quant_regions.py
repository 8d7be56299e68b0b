"""TQ-DiT multi-region quantizers against a plain numpy reimplementation of docs/methods.md §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant import regions as R

CTX = Q.Context("attn.pv", "attn_prob")


def np_two_region_tqdit(a, s, bits):
    """docs/methods.md §4 verbatim: round(clamp(A,s,1)(q-1))/(q-1) + round(clamp(A,0,s)/Δlo)·Δlo (codes clamped)."""
    q = 2 ** (bits - 1)
    lo = s / (q - 1)
    high = np.clip(np.round(np.clip(a, s, 1) * (q - 1)), 0, q - 1) / (q - 1)
    low = np.clip(np.round(np.clip(a, 0, s) / lo), 0, q - 1) * lo
    return high + low


def np_two_region(a, s, bits):
    """The scheme the paper describes: [0, s) with step s/(q-1), [s, 1] with step 1/(q-1)."""
    q = 2 ** (bits - 1)
    out = np.empty_like(a)
    small = a < s
    out[small] = np.clip(np.round(a[small] / (s / (q - 1))), 0, q - 1) * (s / (q - 1))
    out[~small] = np.clip(np.round(a[~small] * (q - 1)), 0, q - 1) / (q - 1)
    return out


def np_two_sided(x, dp, bits):
    """clamp(round(x/Δ+),0,q-1)Δ+ + clamp(round(x/Δ-),-q,0)Δ-, Δ- = 0.16997124/q."""
    q = 2 ** (bits - 1)
    dn = 0.16997124 / q
    return np.clip(np.round(x / dp), 0, q - 1) * dp + np.clip(np.round(x / dn), -q, 0) * dn


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def softmax_probs(seed, shape=(4, 64)):
    z = 3.0 * normal(seed, shape)
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("split", [2.0**-1, 2.0**-5, 2.0**-9])
def test_softmax_two_region_matches_numpy(bits, split):
    a = softmax_probs(bits)
    edges = np.array([0.0, split, np.nextafter(split, 0, dtype=np.float32), 1.0, split / 3, 0.9999], np.float32)
    a = np.concatenate([a.reshape(-1), edges])
    for mode, ref in (("regions", np_two_region), ("tqdit", np_two_region_tqdit)):
        t = R.softmax_two_region(bits=bits, split=split, mode=mode)
        got = jax.jit(t.apply, static_argnums=2)(jnp.asarray(a), t.init({}), CTX)
        np.testing.assert_allclose(got, ref(a, np.float32(split), bits), rtol=1e-6, atol=1e-9, err_msg=mode)


def test_two_region_regions_mode_keeps_small_probabilities_fine():
    # Below the split the step is split/(q-1): a tiny probability survives; with one 8-bit
    # uniform grid over [0, 1] (step 1/255) it would round to 0.
    a = jnp.array([1e-3, 0.3])
    got = R.two_region_quantize(a, 2.0**-6, bits=8)
    assert abs(float(got[0]) - 1e-3) <= 2.0**-6 / 127 / 2 + 1e-9
    assert abs(float(got[1]) - 0.3) <= 1 / 127 / 2 + 1e-7


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_post_gelu_two_sided_matches_numpy(bits):
    x = np.asarray(jax.nn.gelu(4.0 * normal(bits, (512,))), np.float32)
    x = np.concatenate([x, np.array([-0.16997124, -0.2, 0.0, 1e-4, 50.0], np.float32)])
    dp = float(np.max(x[:512]) / (2 ** (bits - 1) - 0.5))
    t = R.post_gelu_two_sided(bits=bits)
    state = t.init(Q.stack_stats([{"max": jnp.float32(x[:256].max())}, {"max": jnp.float32(x[:512].max())}]))
    np.testing.assert_allclose(state["delta_pos"], dp, rtol=1e-6)
    got = t.apply(jnp.asarray(x), state, CTX)
    np.testing.assert_allclose(got, np_two_sided(x, np.float32(dp), bits), rtol=1e-6, atol=1e-7)
    assert float(got[-5]) == pytest.approx(-0.16997124, rel=1e-6)  # GELU's minimum is representable
    assert float(got[-1]) == pytest.approx((2 ** (bits - 1) - 1) * dp, rel=1e-6)  # saturates


def test_split_search_from_calibration_stats_picks_the_least_mse_split():
    a = softmax_probs(7, (8, 128))
    _, stats = Q.collect_stats(lambda x, quant: quant(x, "attn.pv", "attn_prob", -1), jnp.asarray(a),
                               stat_fn=R.split_stats(bits=6))
    st = Q.stack_stats([stats])["attn.pv:attn_prob"]
    state = R.softmax_two_region(bits=6).init(st)
    errs = [np.mean((np_two_region(a, np.float32(s), 6) - a) ** 2) for s in R.SPLIT_CANDIDATES]
    assert float(state["split"]) == R.SPLIT_CANDIDATES[int(np.argmin(errs))]
    assert float(R.search_split(a, bits=6)) == float(state["split"])
    with pytest.raises(KeyError, match="split_mse"):
        R.softmax_two_region().init({"max": jnp.ones(1)})


def test_delta_pos_search_beats_the_minmax_initialisation():
    x = jax.nn.gelu(jnp.asarray(normal(3, (4096,))) * 2.0).at[0].set(40.0)  # one outlier
    dp = R.search_delta_pos(x, bits=4)
    init = float(jnp.max(x)) / 7.5
    mse = lambda d: float(jnp.mean((R.two_sided_quantize(x, d, 4) - x) ** 2))
    assert mse(dp) < mse(init)
    assert any(np.isclose(float(dp), m * init, rtol=1e-5) for m in R.DELTA_POS_MULTIPLIERS)


def test_regions_keep_dtype_and_pass_gradients_straight_through():
    a = jnp.asarray(softmax_probs(1), jnp.bfloat16)
    got = R.two_region_quantize(a, 2.0**-4, 8)
    assert got.dtype == jnp.bfloat16
    ref = np_two_region(np.asarray(a, np.float32), np.float32(2.0**-4), 8)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float32))
    g = jax.grad(lambda v: jnp.sum(R.two_sided_quantize(v, 0.05, 8) * 3.0))(jnp.linspace(-0.1, 1.0, 7))
    np.testing.assert_allclose(g, 3.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits"):
        R.softmax_two_region(bits=1)
    with pytest.raises(ValueError, match="mode"):
        R.softmax_two_region(mode="twin")
    with pytest.raises(ValueError, match="split"):
        R.softmax_two_region(split=2.0)
    with pytest.raises(ValueError, match="delta_pos"):
        R.post_gelu_two_sided(delta_pos=-1.0)
