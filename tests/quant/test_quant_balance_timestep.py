"""Timestep-aware channel balancing: one EMA salience per time range, per-range α, mapping to sampler steps."""

import jax
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant.balance import ChannelBalance, fold_balance, link_stats
from jdq.quant.balance_timestep import (
    DEFAULT_RANGES,
    per_range_weight_bytes,
    range_groups,
    timestep_balance,
    timestep_balance_pair,
)
from jdq.quant.timegroup import TimeGroups

from quant_toy import toy, toy_block, toy_stats

FACTORS = [1.0, 1.5, 4.0, 3.0, 5.0]  # per-step activation scale: two "noisy" and three "clean" steps


def calib_stats(factors=FACTORS):
    """Linked per-step statistics of the toy block, the activations at step i scaled by ``factors[i]``."""
    st = toy_stats()
    scaled = lambda f: {k: v if k.endswith(":weight") else jax.tree.map(lambda a: a * f, v) for k, v in st.items()}
    return link_stats(Q.stack_stats([scaled(f) for f in factors]))


def ema(rows, m=0.95):
    """ViDiT-Q's EMA written out: first entry as start, then a <- m a + (1 - m) a_t."""
    out = np.asarray(rows[0], np.float64)
    for r in rows[1:]:
        out = m * out + (1 - m) * np.asarray(r, np.float64)
    return out


def w4a8_pair(groups, alphas):
    act, weight = timestep_balance_pair(Q.cast("int8", granularity="row"), Q.cast("int4", granularity="row"),
                                        groups, alphas)
    return [Q.rule("mlp.fc1", act, roles="act"), Q.rule("mlp.fc1", weight, roles="weight")]


def test_range_groups_follow_the_sampler_timesteps():
    ts = [999, 800.4, 600, 500.4, 250, 0]  # a DDIM-like descending schedule
    g = range_groups(ts, DEFAULT_RANGES)
    assert g.table == (1, 1, 1, 0, 0, 0)  # 500.4 rounds to 500, in [0, 500]
    assert range_groups([999, 10], [[0, 1000]]).table == (0, 0)
    with pytest.raises(ValueError, match="no sampler step falls"):
        range_groups([999, 900], DEFAULT_RANGES)


def test_each_range_uses_its_own_ema_salience_and_alpha():
    p, x = toy()
    stats = calib_stats()
    groups = TimeGroups.from_table([1, 1, 0, 0, 0])  # steps 0, 1 in the high-noise range
    alphas = (0.3, 0.6)
    plan = Q.resolve(w4a8_pair(groups, alphas), Q.trace_operands(toy_block, p, x))
    state = plan.init(stats)
    s = np.asarray(state["mlp.fc1:act"]["s"])
    assert s.shape == (2, 32)
    np.testing.assert_array_equal(s, np.asarray(state["mlp.fc1:weight"]["s"]))  # both sides agree
    a_steps = np.asarray(stats["mlp.fc1:act"]["absmax_channel"])
    w = np.maximum(np.asarray(stats["mlp.fc1:act"]["weight_absmax_channel"][0]), 1e-5)
    for g, steps in ((0, [2, 3, 4]), (1, [0, 1])):
        a = np.maximum(ema(a_steps[steps]), 1e-5)
        # float32 pow of O(1..100) inputs: a few ulps
        np.testing.assert_allclose(s[g], a ** alphas[g] / w ** (1 - alphas[g]), rtol=1e-5)
    # the balance is exact in float at every step (the re-parameterisation), and each step picks its range
    plan_f = Q.resolve([Q.rule("mlp.fc1", t, roles=r) for t, r in zip(
        timestep_balance_pair(Q.identity(), Q.identity(), groups, alphas), ("act", "weight"))],
        Q.trace_operands(toy_block, p, x))
    st_f = plan_f.init(stats)
    for i in range(5):
        np.testing.assert_allclose(toy_block(p, x, quant=plan_f.bind(st_f, step=i)), toy_block(p, x),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="time-grouped weight balance"):
        fold_balance(plan, state, {"mlp.fc1": p["fc1_w"]})
    with pytest.raises(ValueError, match="needs the sampler step"):
        toy_block(p, x, quant=plan.bind(state))


def test_one_range_equals_static_balancing():
    p, x = toy()
    stats = calib_stats()
    ops = Q.trace_operands(toy_block, p, x)
    grouped = Q.resolve(w4a8_pair(range_groups([999, 700, 400, 200, 0], [[0, 1000]]), 0.4), ops)
    bal = ChannelBalance(alpha=0.4, salience="ema", momentum=0.95)
    static = Q.resolve([Q.rule("mlp.fc1", bal.act(Q.cast("int8", granularity="row")), roles="act"),
                        Q.rule("mlp.fc1", bal.weight(Q.cast("int4", granularity="row")), roles="weight")], ops)
    sg, ss = grouped.init(stats), static.init(stats)
    np.testing.assert_array_equal(sg["mlp.fc1:act"]["s"][0], ss["mlp.fc1:act"]["s"])
    for i in range(5):  # same arithmetic on the same s: identical outputs
        np.testing.assert_array_equal(toy_block(p, x, quant=grouped.bind(sg, step=i)),
                                      toy_block(p, x, quant=static.bind(ss)))


def test_per_range_weights_double_the_memory_and_bad_options_are_named():
    assert per_range_weight_bytes([(32, 64), (64, 32)], 4, 2) == {"one_copy": 2048, "per_range": 4096}
    g = TimeGroups.from_table([0, 1])
    with pytest.raises(ValueError, match="2 alphas for"):
        timestep_balance("act", Q.identity(), TimeGroups.from_table([0, 1, 2]), (0.1, 0.2))
    with pytest.raises(ValueError, match="side"):
        timestep_balance("both", Q.identity(), g)
    with pytest.raises(ValueError, match="alpha"):
        timestep_balance("act", Q.identity(), g, (0.1, 1.5))
