"""The transform protocol: rules, plans, quantizers, operand tracing and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.models.layers import attention, qlinear


def toy_model(p, x, quant=None):
    """Two linears around a GELU and one attention: 10 operands."""
    h = qlinear(x, p["w1"], p["b1"], site="mlp.fc1", quant=quant)
    h = jax.nn.gelu(h)
    y = qlinear(h, p["w2"], site="mlp.fc2", quant=quant, act_role="post_gelu")
    q = y.reshape(y.shape[0], y.shape[1], 2, -1)
    a = attention(q, q, q, site="attn", quant=quant)
    return a.reshape(y.shape)


@pytest.fixture
def toy():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(k1, (8, 16)),
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 8)),
    }
    x = jax.random.normal(k3, (2, 5, 8))
    return p, x


def scale_by(c):
    """A stateless transform that multiplies its operand by ``c`` (easy to detect)."""
    return Q.stateless(lambda x, ctx: x * c, meta=("scale", c))


def test_trace_operands_lists_every_matmul_operand_with_role_and_axis(toy):
    p, x = toy
    ops = Q.trace_operands(toy_model, p, x)
    assert [o.key for o in ops] == [
        "mlp.fc1:act", "mlp.fc1:weight", "mlp.fc2:post_gelu", "mlp.fc2:weight",
        "attn.qk:q", "attn.qk:k", "attn.pv:attn_prob", "attn.pv:v",
    ]
    by_key = {o.key: o for o in ops}
    assert by_key["mlp.fc1:weight"].axis == -2 and by_key["mlp.fc1:weight"].shape == (8, 16)
    assert by_key["attn.qk:k"].shape == (2, 2, 4, 5)  # kᵀ: contraction axis -2
    assert by_key["attn.pv:attn_prob"].shape == (2, 2, 5, 5)


def test_first_matching_rule_wins_and_plan_reports_unmatched_and_uncovered(toy):
    p, x = toy
    ops = Q.trace_operands(toy_model, p, x)
    rules = [
        Q.keep_float("mlp.fc2", roles="weight", name="fc2-weight-float"),
        Q.rule("mlp.*", scale_by(2.0), roles=("weight",), name="weights"),
        Q.rule("mlp.*", scale_by(3.0), roles=Q.ACTIVATION_ROLES, name="acts"),
        Q.rule("blocks.*", scale_by(5.0), name="typo"),
    ]
    plan = Q.resolve(rules, ops)
    assert plan.transform_for("mlp.fc2:weight") is None  # kept in float by the first rule
    assert plan.transform_for("mlp.fc1:weight").meta == ("scale", 2.0)
    assert plan.transform_for("mlp.fc2:post_gelu").meta == ("scale", 3.0)
    assert [r.name for r in plan.unmatched_rules()] == ["typo"]
    assert sorted(o.key for o in plan.uncovered()) == sorted(
        ["attn.qk:q", "attn.qk:k", "attn.pv:attn_prob", "attn.pv:v"]
    )
    assert "unmatched rule: typo" in plan.report()


def test_quantizer_applies_bound_transforms_under_jit(toy):
    p, x = toy
    ops = Q.trace_operands(toy_model, p, x)
    plan = Q.resolve([Q.rule("mlp.fc1", scale_by(2.0), roles="weight")], ops)
    qz = plan.bind(plan.init())
    got = jax.jit(lambda p, x, q: toy_model(p, x, quant=q))(p, x, qz)
    p2 = dict(p, w1=p["w1"] * 2.0)
    np.testing.assert_allclose(got, toy_model(p2, x), rtol=1e-5, atol=1e-5)


def test_regex_patterns_and_role_validation():
    r = Q.rule("re:blocks\\.[0-3]\\.mlp\\.fc[12]", None)
    assert r.matches("blocks.2.mlp.fc1", "act") and not r.matches("blocks.12.mlp.fc1", "act")
    with pytest.raises(ValueError, match="unknown role"):
        Q.rule("*", None, roles="activation")
    with pytest.raises(ValueError, match="regular expression"):
        Q.rule("re:(", None)


def test_strict_quantizer_rejects_operands_of_another_model(toy):
    p, x = toy
    plan = Q.resolve([Q.rule("*", scale_by(2.0))], Q.trace_operands(toy_model, p, x))
    qz = plan.bind(plan.init())
    with pytest.raises(KeyError, match="another model"):
        qlinear(x, p["w1"], site="other.fc", quant=qz)


def test_init_names_the_operand_and_statistic_a_transform_lacks(toy):
    p, x = toy
    needs_absmax = Q.QuantTransform(init=lambda s: {"a": s["absmax"]}, apply=lambda x, s, c: x)
    plan = Q.resolve([Q.rule("mlp.fc1", needs_absmax, roles="act")], Q.trace_operands(toy_model, p, x))
    with pytest.raises(KeyError, match="mlp.fc1:act.*absmax"):
        plan.init({})


def test_collect_stats_matches_numpy_and_stacks_over_steps(toy):
    p, x = toy
    out, stats = Q.collect_stats(toy_model, p, x)
    np.testing.assert_allclose(out, toy_model(p, x), rtol=1e-6)
    s = stats["mlp.fc1:act"]
    xn = np.asarray(x).reshape(-1, 8)
    # max, min and |·| round nothing and do not depend on the reduction order; ×2 is exact: equal bit for bit
    np.testing.assert_array_equal(s["absmax_channel"], np.abs(xn).max(0))
    np.testing.assert_array_equal(s["min"], xn.min())
    w = stats["mlp.fc1:weight"]  # contraction axis -2: one value per input channel
    np.testing.assert_array_equal(w["absmax_channel"], np.abs(np.asarray(p["w1"])).max(1))
    stacked = Q.stack_stats([stats, jax.tree.map(lambda a: a * 2, stats)])
    assert stacked["mlp.fc1:act"]["absmax"].shape == (2,)
    reduced = Q.reduce_steps(stacked["mlp.fc1:act"])
    np.testing.assert_array_equal(reduced["absmax"], 2 * s["absmax"])
    np.testing.assert_array_equal(reduced["min"], 2 * s["min"] if s["min"] < 0 else s["min"])


def test_chain_composes_in_order_and_stacks_states():
    add = Q.QuantTransform(init=lambda s: jnp.float32(1.0), apply=lambda x, s, c: x + s)
    mul = Q.QuantTransform(init=lambda s: jnp.float32(3.0), apply=lambda x, s, c: x * s)
    c = Q.chain(add, mul)
    state = c.init({})
    ctx = Q.Context("s", "act")
    assert float(c.apply(jnp.float32(2.0), state, ctx)) == 9.0  # (2 + 1) * 3, not 2 * 3 + 1
    with pytest.raises(TypeError, match="argument 1"):
        Q.chain(add, lambda x: x)


def test_quantizer_at_step_reaches_context_inside_jit(toy):
    p, x = toy
    step_scaled = Q.stateless(lambda x, ctx: x * (ctx.step + 1).astype(x.dtype))
    plan = Q.resolve([Q.rule("mlp.fc1", step_scaled, roles="weight")], Q.trace_operands(toy_model, p, x))
    qz = plan.bind(plan.init())
    f = jax.jit(lambda q, i: toy_model(p, x, quant=q.at_step(i)))
    for i in range(3):
        np.testing.assert_allclose(f(qz, jnp.int32(i)), toy_model(dict(p, w1=p["w1"] * (i + 1)), x), rtol=1e-5, atol=1e-5)
