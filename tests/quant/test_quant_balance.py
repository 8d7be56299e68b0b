"""Channel balancing: the smoothing formula, statistics hand-off, and re-parameterisation equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant.balance import (
    ChannelBalance,
    fold_balance,
    fold_into_affine,
    fold_into_modulation,
    fold_into_weight,
    link_stats,
    pop_act_scales,
    spearman,
)
from jdq.quant.timegroup import time_grouped

from quant_toy import WEIGHT_OF, layer_norm, toy, toy_block, toy_stats


def calib_stats(factors):
    """Linked statistics over 'steps': at step i the activations' statistics are scaled by ``factors[i]``."""
    st = toy_stats()
    scaled = lambda f: {k: v if k.endswith(":weight") else jax.tree.map(lambda a: a * f, v) for k, v in st.items()}
    return link_stats(Q.stack_stats([scaled(f) for f in factors]))


def recorder():
    """An inner transform whose state is the statistics it was initialised with (to inspect them)."""
    return Q.QuantTransform(init=lambda s: {"absmax": s["absmax"], "absmax_channel": s["absmax_channel"]},
                            apply=lambda x, s, c: x)


def test_smoothing_factors_follow_the_vidit_q_formula():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 20, (3, 16)).astype(np.float32)
    w = rng.uniform(0.01, 2, (16,)).astype(np.float32)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        s = ChannelBalance(alpha=alpha).scales(a, w)
        np.testing.assert_allclose(s, a.max(0) ** alpha / w ** (1 - alpha), rtol=1e-5)
    # mean and EMA (momentum 0.95, first entry as start) over steps
    np.testing.assert_allclose(ChannelBalance(salience="mean").act_salience(a, w), a.mean(0), rtol=1e-6)
    ema = a[0]
    for t in range(1, 3):
        ema = 0.95 * ema + 0.05 * a[t]
    np.testing.assert_allclose(ChannelBalance(salience="ema").act_salience(a, w), ema, rtol=1e-5)
    # a dead channel gives a finite, positive factor
    s = ChannelBalance().scales(np.zeros(4, np.float32), np.zeros(4, np.float32))
    assert np.all(np.isfinite(s)) and np.all(np.asarray(s) > 0)


def test_ptq4dit_balanced_salience_is_alpha_half_and_ssc_weights_by_spearman():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.1, 5, (4, 10)).astype(np.float32)
    w = rng.uniform(0.1, 5, (10,)).astype(np.float32)
    # x' = x · s̃/a with s̃ = sqrt(a w)  <=>  x / s with s = sqrt(a / w)
    s = ChannelBalance(alpha=0.5).scales(a[:1], w)
    np.testing.assert_allclose(1 / s, np.sqrt(a[0] * w) / a[0], rtol=1e-5)
    # SSC as adreamwu/PTQ4DiT's models.py computes it: eta = softmax(-rho) over the rows (samples),
    # rho_i = scipy Spearman(a_i, w)
    from scipy.special import softmax
    from scipy.stats import spearmanr

    rho = np.array([spearmanr(a[t], w).statistic for t in range(4)])
    np.testing.assert_allclose(spearman(a, np.broadcast_to(w, a.shape)), rho, rtol=1e-5, atol=1e-6)
    eta = softmax(-rho)
    np.testing.assert_allclose(ChannelBalance(salience="ssc").act_salience(a, w), eta @ a, rtol=1e-5)
    ties = np.array([1.0, 2.0, 2.0, 3.0], np.float32)
    assert float(spearman(ties, ties[::-1])) == pytest.approx(spearmanr(ties, ties[::-1]).statistic, abs=1e-6)


def test_inner_transforms_see_statistics_of_the_balanced_operand():
    p, x = toy()
    stats = calib_stats([1.0, 2.0])
    bal = ChannelBalance(alpha=0.5)
    sa = stats["attn.qkv:act"]
    act_state = bal.act(recorder()).init(sa)
    s = bal.scales(sa["absmax_channel"], sa["weight_absmax_channel"])
    np.testing.assert_allclose(act_state["s"], s, rtol=1e-6)
    np.testing.assert_allclose(act_state["inner"]["absmax_channel"], sa["absmax_channel"] / s, rtol=1e-6)
    # whole-tensor |max| of x / s, per step, equals what the balanced activation really has
    h = layer_norm(x, p["ln1_g"], p["ln1_b"])
    np.testing.assert_allclose(act_state["inner"]["absmax"][0], jnp.abs(h / s).max(), rtol=1e-5)
    w_state = bal.weight(recorder()).init(stats["attn.qkv:weight"])
    np.testing.assert_allclose(w_state["s"], s, rtol=1e-6)  # both sides agree on s
    np.testing.assert_allclose(w_state["inner"]["absmax"][0], jnp.abs(p["qkv_w"] * s[:, None]).max(), rtol=1e-5)
    with pytest.raises(KeyError, match="weight_absmax_channel"):
        bal.act(Q.identity()).init(Q.stack_stats([toy_stats()])["attn.qkv:act"])


def balanced_plan(p, x, balance, sites=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
    ops = Q.trace_operands(toy_block, p, x)
    pattern = "re:" + "|".join(s.replace(".", r"\.") for s in sites)
    rules = [
        Q.rule(pattern, balance.act(Q.identity()), roles=Q.ACTIVATION_ROLES),
        Q.rule(pattern, balance.weight(Q.identity()), roles="weight"),
    ]
    return Q.resolve(rules, ops)


def test_reparameterisation_leaves_the_float_output_unchanged():
    p, x = toy()
    stats = calib_stats([1.0, 0.5])
    bal = ChannelBalance(alpha=0.6)
    plan = balanced_plan(p, x, bal)
    assert not plan.unmatched_rules()
    state = plan.init(stats)
    ref = toy_block(p, x)
    f = jax.jit(lambda p, q: toy_block(p, x, quant=q))
    # 1. runtime balancing on both sides: x/s and W·s
    np.testing.assert_allclose(f(p, plan.bind(state)), ref, rtol=1e-5, atol=1e-5)
    # 2. weights folded offline: the weight side no longer multiplies
    weights = {site: p[name] for site, name in WEIGHT_OF.items()}
    folded_w, state2 = fold_balance(plan, state, weights)
    assert all(state2[f"{site}:weight"]["s"] is None for site in WEIGHT_OF)
    p2 = dict(p, **{WEIGHT_OF[site]: w for site, w in folded_w.items()})
    np.testing.assert_allclose(f(p2, plan.bind(state2)), ref, rtol=1e-5, atol=1e-5)
    s_qkv = state["attn.qkv:act"]["s"]
    np.testing.assert_allclose(folded_w["attn.qkv"], p["qkv_w"] * s_qkv[:, None], rtol=1e-6)
    # the folded weight is used as is: applying the folded state to the *old* weights differs
    assert not np.allclose(f(p, plan.bind(state2)), ref, atol=1e-3)
    # 3. activation scales of qkv and fc1 folded into the preceding LayerNorm affines: no runtime division there
    scales, state3 = pop_act_scales(plan, state2, sites=("attn.qkv", "mlp.fc1"))
    assert set(scales) == {"attn.qkv", "mlp.fc1"} and state3["attn.qkv:act"]["s"] is None
    assert state3["attn.proj:act"]["s"] is not None  # no preceding op folded there
    g1, b1 = fold_into_affine(p["ln1_g"], p["ln1_b"], scales["attn.qkv"])
    g2, b2 = fold_into_affine(p["ln2_g"], p["ln2_b"], scales["mlp.fc1"])
    p3 = dict(p2, ln1_g=g1, ln1_b=b1, ln2_g=g2, ln2_b=b2)
    np.testing.assert_allclose(f(p3, plan.bind(state3)), ref, rtol=1e-5, atol=1e-5)


def test_balancing_reduces_activation_outliers_of_the_toy_block():
    p, x = toy()
    stats = calib_stats([1.0])
    s = ChannelBalance(alpha=0.5).scales(stats["attn.qkv:act"]["absmax_channel"], stats["attn.qkv:act"]["weight_absmax_channel"])
    a = stats["attn.qkv:act"]["absmax_channel"][0]
    ratio = lambda v: float(jnp.max(v) / jnp.median(v))
    assert ratio(a / s) < ratio(a) / 3  # the two outlier channels (gamma 12) are tamed


def test_fold_into_modulation_matches_adaln():
    rng = np.random.default_rng(5)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    c, x = n(3, 7), n(3, 5, 16)
    w_sh, w_sc, b_sh, b_sc = n(7, 16), n(7, 16), n(16), n(16)
    s = jnp.exp(n(16))

    def modulate(x, w_sh, b_sh, w_sc, b_sc):
        shift, scale = c @ w_sh + b_sh, c @ w_sc + b_sc
        return x * (1 + scale[:, None]) + shift[:, None]

    got = modulate(x, *fold_into_modulation(w_sh, b_sh, w_sc, b_sc, s))
    np.testing.assert_allclose(got, modulate(x, w_sh, b_sh, w_sc, b_sc) / s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fold_into_weight(jnp.ones((16, 4)), s)[:, 0], s, rtol=1e-6)


def test_timestep_aware_balancing_has_one_s_per_group_and_refuses_to_fold():
    p, x = toy()
    stats = calib_stats([1.0, 1.0, 3.0, 3.0])  # steps 2, 3: 3x larger activations 
    bal = ChannelBalance(alpha=0.5)
    ops = Q.trace_operands(toy_block, p, x)
    rules = [
        Q.rule("mlp.fc1", time_grouped(bal.act(Q.identity()), num_groups=2, group_len=2), roles="act"),
        Q.rule("mlp.fc1", time_grouped(bal.weight(Q.identity()), num_groups=2, group_len=2), roles="weight"),
    ]
    plan = Q.resolve(rules, ops)
    state = plan.init(stats)
    s = state["mlp.fc1:act"]["s"]
    assert s.shape == (2, 32)
    np.testing.assert_allclose(s[1] / s[0], np.sqrt(3.0), rtol=1e-4)  # a_j scales by 3, alpha 1/2
    f = jax.jit(lambda q, i: toy_block(p, x, quant=q.at_step(i)))
    for i in range(4):  # exact re-parameterisation at every step, whichever group
        np.testing.assert_allclose(f(plan.bind(state), i), toy_block(p, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="time-grouped weight balance"):
        fold_balance(plan, state, {"mlp.fc1": p["fc1_w"]})
    with pytest.raises(KeyError, match="mlp.fc1"):
        fold_balance(balanced_plan(p, x, bal, sites=("mlp.fc1",)),
                     balanced_plan(p, x, bal, sites=("mlp.fc1",)).init(stats), {})


def test_bad_balance_options_are_named():
    with pytest.raises(ValueError, match="alpha"):
        ChannelBalance(alpha=1.5)
    with pytest.raises(ValueError, match="salience"):
        ChannelBalance(salience="median")


def test_ssc_reads_streamed_softmax_sums_when_calibration_provides_them():
    rng = np.random.default_rng(3)
    rows = rng.uniform(0.1, 5, (6, 10)).astype(np.float32)  # six calibration samples
    w = rng.uniform(0.1, 5, (10,)).astype(np.float32)
    rho = np.asarray(spearman(rows, np.broadcast_to(w, rows.shape)))
    e = np.exp(-rho)
    # the sums of two slots (steps) of three samples each, as jdq.quant.calibrate streams them
    num = np.stack([(e[:3, None] * rows[:3]).sum(0), (e[3:, None] * rows[3:]).sum(0)])
    den = np.array([e[:3].sum(), e[3:].sum()], np.float32)
    stats = {"absmax_channel": rows.reshape(2, 3, 10).max(1), "weight_absmax_channel": np.stack([w, w]),
             "ssc_num": num, "ssc_den": den}
    bal = ChannelBalance(salience="ssc")
    state = bal.act(Q.identity()).init(stats)
    expect = bal.scales(ChannelBalance(salience="ssc").act_salience(rows, w), w)
    np.testing.assert_allclose(state["s"], expect, rtol=1e-5)
