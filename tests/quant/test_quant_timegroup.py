"""Time-grouped state (TQ-DiT TGQ, ViDiT-Q time ranges): group choice, per-group init, one jit for all steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant.regions import post_gelu_two_sided, two_sided_quantize
from jdq.quant.timegroup import TimeGroups, split_stats_by_group, stack_states, time_grouped

from quant_toy import toy, toy_block


def test_uniform_groups_follow_tqdit_rule_at_boundaries():
    g = TimeGroups.uniform(num_groups=25, group_len=10)
    steps = np.array([0, 9, 10, 11, 19, 20, 239, 240, 249, 250, 999])
    expect = np.minimum(steps // 10, 24)
    np.testing.assert_array_equal(g.index_np(steps), expect)
    got = jax.jit(jax.vmap(g.index))(jnp.asarray(steps))
    np.testing.assert_array_equal(got, expect)


def test_boundaries_and_tables_pick_the_right_group_at_edges():
    g = TimeGroups.from_boundaries([5, 12])
    steps = jnp.array([0, 4, 5, 6, 11, 12, 13, 100])
    np.testing.assert_array_equal(jax.jit(jax.vmap(g.index))(steps), [0, 0, 1, 1, 1, 2, 2, 2])
    # ViDiT-Q: t in [0, 500] -> group 0, t in [501, 1000] -> group 1; a 6-step sampler from t=1000.
    g = TimeGroups.from_timesteps([1000, 800, 501, 500, 200, 0], [[0, 500], [501, 1000]])
    assert g.table == (1, 1, 1, 0, 0, 0)
    np.testing.assert_array_equal(jax.vmap(g.index)(jnp.arange(8)), [1, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="500.5"):
        TimeGroups.from_timesteps([500.5], [[0, 500], [501, 1000]])
    with pytest.raises(ValueError, match="exactly one"):
        TimeGroups(num_groups=2, group_len=3, boundaries=(4,))
    with pytest.raises(ValueError, match="strictly increasing"):
        TimeGroups.from_boundaries([5, 5])


def test_init_builds_each_group_from_its_own_steps():
    # Calibration saw steps 0, 3, 7, 9 (group_len 4, 3 groups): group 0 <- {0, 3}, 1 <- {7}, 2 <- {9}.
    stats = {"max": jnp.array([1.0, 3.0, 5.0, 2.0]), "step": jnp.array([0, 3, 7, 9])}
    t = time_grouped(post_gelu_two_sided(bits=8), num_groups=3, group_len=4)
    state = t.init(stats)
    np.testing.assert_allclose(state["delta_pos"], np.array([3.0, 5.0, 2.0]) / 127.5, rtol=1e-6)
    with pytest.raises(ValueError, match="group 1 of 3 has no calibration"):
        t.init({"max": jnp.array([1.0, 3.0]), "step": jnp.array([0, 9])})
    # Without a "step" entry, entry i is step i.
    parts = split_stats_by_group({"max": jnp.arange(6.0)}, TimeGroups.uniform(2, 3))
    np.testing.assert_array_equal(parts[1]["max"], [3.0, 4.0, 5.0])


def test_apply_without_a_step_names_the_site():
    t = time_grouped(post_gelu_two_sided(delta_pos=0.1), num_groups=2, group_len=1)
    with pytest.raises(ValueError, match="fc2:post_gelu needs the sampler step"):
        t.apply(jnp.ones(3), t.init({}), Q.Context("fc2", "post_gelu"))


def _grouped_plan(p, x, deltas, group_len):
    ops = Q.trace_operands(toy_block, p, x)
    t = time_grouped(post_gelu_two_sided(bits=4), num_groups=len(deltas), group_len=group_len)
    plan = Q.resolve([Q.rule("mlp.fc2", t, roles="post_gelu")], ops)
    state = {"mlp.fc2:post_gelu": stack_states([{"delta_pos": jnp.float32(d)} for d in deltas])}
    return plan, state


def test_jit_once_python_loop_uses_each_steps_group():
    p, x = toy()
    deltas = [0.02, 0.1, 0.5]  # very different 4-bit steps: outputs differ per group
    plan, state = _grouped_plan(p, x, deltas, group_len=2)
    traces = []

    def run(q, step):
        traces.append(1)
        return toy_block(p, x, quant=q.at_step(step))

    f = jax.jit(run)
    qz = plan.bind(state)
    outs = [f(qz, jnp.int32(i)) for i in range(7)]
    assert len(traces) == 1  # traced once for all seven steps
    for i, out in enumerate(outs):
        g = min(i // 2, 2)
        ref = toy_block(p, x, quant=_fixed_delta_quantizer(p, x, deltas[g]))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"step {i} should use group {g}")
    assert not np.allclose(outs[0], outs[2]) and not np.allclose(outs[2], outs[4])


def _fixed_delta_quantizer(p, x, delta):
    ops = Q.trace_operands(toy_block, p, x)
    plan = Q.resolve([Q.rule("mlp.fc2", post_gelu_two_sided(bits=4, delta_pos=delta), roles="post_gelu")], ops)
    return plan.bind(plan.init())


def test_jit_once_fori_loop_uses_each_steps_group():
    p, x = toy()
    deltas = [0.02, 0.1, 0.5]
    plan, state = _grouped_plan(p, x, deltas, group_len=3)
    traces = []

    @jax.jit
    def sample(q):
        traces.append(1)

        def body(i, acc):
            return acc.at[i].set(toy_block(p, x, quant=q.at_step(i)))

        return jax.lax.fori_loop(0, 8, body, jnp.zeros((8,) + x.shape))

    outs = sample(plan.bind(state))
    sample(plan.bind(stack_like(state, 2.0)))  # new state values: no retrace
    assert len(traces) == 1
    for i in range(8):
        ref = toy_block(p, x, quant=_fixed_delta_quantizer(p, x, deltas[min(i // 3, 2)]))
        np.testing.assert_allclose(outs[i], ref, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


def stack_like(state, factor):
    """The same state with every leaf scaled (same structure, so no retrace)."""
    return jax.tree.map(lambda a: a * factor, state)


def test_grouped_transform_inside_vmap_over_steps():
    """The group index may be a batched tracer (vmap over steps), not only a scalar."""
    t = time_grouped(post_gelu_two_sided(bits=4), num_groups=2, group_len=1)
    state = stack_states([{"delta_pos": jnp.float32(0.05)}, {"delta_pos": jnp.float32(0.3)}])
    x = jnp.linspace(-0.2, 2.0, 11)
    f = jax.vmap(lambda i: t.apply(x, state, Q.Context("s", "post_gelu", step=i)))
    out = f(jnp.arange(2))
    np.testing.assert_allclose(out[0], two_sided_quantize(x, 0.05, 4), rtol=1e-6)
    np.testing.assert_allclose(out[1], two_sided_quantize(x, 0.3, 4), rtol=1e-6)
