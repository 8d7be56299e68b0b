"""Recipes built from the transform library: plan reports, stage discovery for lowering/cost, one jit."""

import jax
import jax.numpy as jnp
import numpy as np

from jdq import quant as Q

from quant_toy import toy, toy_block, toy_stats


def mixed_rules():
    """A recipe touching every transform family: balance+cast, outliers, MRQ, time groups, a typo."""
    bal = Q.ChannelBalance(alpha=0.5)
    return [
        Q.rule("attn.qkv", bal.act(Q.cast("int8", static=True, granularity="tensor")), roles="act", name="qkv-act"),
        Q.rule("attn.qkv", bal.weight(Q.cast("int8", granularity="output_channel")), roles="weight", name="qkv-w"),
        Q.rule("mlp.fc2", Q.post_gelu_two_sided(bits=8), roles="post_gelu", name="fc2-gelu"),
        Q.rule("attn.pv", Q.time_grouped(Q.softmax_two_region(bits=8, split=2.0**-6), num_groups=2, group_len=3),
               roles="attn_prob", name="probs-tgq"),
        Q.rule("attn.qk", Q.outlier_split(0.1, granularity="element"), roles=("q", "k"), name="qk-outliers"),
        Q.rule("blocks.*.mlp.fc1", Q.cast("mx6"), name="typo: the toy has no blocks"),
        Q.keep_float("attn.proj", name="proj-float"),
    ]


def test_plan_reports_unmatched_rules_and_uncovered_operands():
    p, x = toy()
    plan = Q.resolve(mixed_rules(), Q.trace_operands(toy_block, p, x))
    assert [r.name for r in plan.unmatched_rules()] == ["typo: the toy has no blocks"]
    assert sorted(o.key for o in plan.uncovered()) == ["attn.pv:v", "mlp.fc1:act", "mlp.fc1:weight", "mlp.fc2:weight"]
    report = plan.report()
    assert "unmatched rule: typo" in report and "4 uncovered operands" in report
    assert plan.transform_for("attn.proj:act") is None  # kept in float: covered, not quantized


def test_stages_expose_formats_and_state_to_lowering_and_cost_model():
    p, x = toy()
    plan = Q.resolve(mixed_rules(), Q.trace_operands(toy_block, p, x))
    one = toy_stats()
    state = plan.init(Q.link_stats(Q.stack_stats([one, one])))
    casts = Q.find_stages(plan.transform_for("attn.qkv:act").meta, state["attn.qkv:act"], "cast")
    (meta, st, stacked), = casts
    assert (meta.fmt, meta.scaling, meta.granularity, stacked) == ("int8", "static", "tensor", False)
    a = state["attn.qkv:act"]  # the static scale was calibrated on the balanced activation x / s
    np.testing.assert_allclose(st["scale"], (one["attn.qkv:act"]["absmax_channel"] / a["s"]).max() / 127, rtol=1e-6)
    (tg, tgs, _), = Q.find_stages(plan.transform_for("attn.pv:attn_prob").meta, state["attn.pv:attn_prob"], "time_grouped")
    assert tg.groups.num_groups == 2
    (mrq, mrqs, stacked), = Q.find_stages(tg, tgs, "multi_region")
    assert stacked and mrqs["split"].shape == (2,)  # one split per time group
    metas = [m for m, _, _ in Q.find_stages(plan.transform_for("attn.qk:q").meta, None)]
    assert metas[0].hi.name == "mx9" and metas[0].lo.name == "mx6"
    assert all(hash(plan.transform_for(k).meta) is not None for k in plan.quantized_keys)


def test_a_whole_recipe_compiles_once_and_steps_through_a_scan():
    p, x = toy()
    plan = Q.resolve(mixed_rules(), Q.trace_operands(toy_block, p, x))
    one = toy_stats()
    state = plan.init(Q.link_stats(Q.stack_stats([one] * 6)))
    state["attn.pv:attn_prob"] = Q.stack_states([{"split": jnp.float32(2.0**-2)}, {"split": jnp.float32(2.0**-8)}])
    traces = []

    @jax.jit
    def sample(q, x):
        traces.append(1)

        def step(h, i):
            y = toy_block(p, h, quant=q.at_step(i))
            return h, y

        return jax.lax.scan(step, x, jnp.arange(6))[1]

    ys = sample(plan.bind(state), x)
    assert len(traces) == 1 and ys.shape == (6,) + x.shape
    np.testing.assert_array_equal(ys[0], ys[2])  # same group, same input
    np.testing.assert_array_equal(ys[3], ys[5])
    assert not np.array_equal(ys[2], ys[3])  # group 0 -> 1 at step 3
    ref = toy_block(p, x)
    rel = float(jnp.sqrt(jnp.mean((ys - ref) ** 2) / jnp.mean(ref**2)))
    assert 0 < rel < 0.05  # quantized (2% here, mostly MX6 q·kᵀ), not broken
