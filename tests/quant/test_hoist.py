"""Weights quantized once before the sampler's loop (jdq.quant.hoist): which are hoisted, and the samples do not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.quant.hoist import HoistedWeights, hoist_weights, step_classes
from jdq.quant.select import selectable
from jdq.quant.timegroup import TimeGroups, time_grouped
from jdq.sampling import ddim, sample, sample_keys
from tests.sampling import toy

PARAMS = toy.init()
LABELS = jnp.array([0, 1, 2, 1], jnp.int32)
OPS = Q.trace_operands(toy.apply, PARAMS, jnp.zeros((1,) + toy.SHAPE), jnp.zeros((1,)), LABELS[:1])


def _counting_cast(counter):
    """An int4 weight cast that records, per trace, whether it ran inside the loop (its step traced); meta: a real cast's."""
    base = Q.cast("int4", granularity="row")

    def apply(x, state, ctx):
        counter.append((ctx.site, not isinstance(ctx.step, int)))
        return base.apply(x, state, ctx)
    return Q.QuantTransform(base.init, apply, base.meta)


def _run(plan, state, hoist, steps=4):
    return np.asarray(sample(toy.apply, PARAMS, ddim(steps), LABELS, sample_keys(0, 4), toy.SHAPE,
                             quant=plan.bind(state), hoist_weights=hoist))


def test_hoisted_weights_give_the_same_samples_and_are_traced_once_not_per_step():
    traced = []
    plan = Q.resolve([Q.rule("*", _counting_cast(traced), roles=("weight",)),
                      Q.rule("*", Q.cast("int8", granularity="row"), roles=("act", "post_gelu"))], OPS)
    state = plan.init()
    a = _run(plan, state, hoist=True)
    hoisted = list(traced)
    b = _run(plan, state, hoist=False)
    np.testing.assert_array_equal(a, b)  # the same casts of the same weights
    assert sorted(hoisted) == [("fc1", False), ("fc2", False)]  # once each, before the scan (a concrete step)
    assert {inside for _, inside in traced[len(hoisted):]} == {True}  # without hoisting: inside the scan
    assert not np.array_equal(a, _run(Q.resolve([Q.keep_float("*")], OPS), {}, hoist=True))  # quantization acts


def test_time_grouped_weights_are_hoisted_per_group_and_picked_by_step():
    groups = TimeGroups.from_boundaries((2,))
    t = time_grouped(selectable(Q.cast("int8", granularity="row"), Q.cast("int2", granularity="row")), groups)
    plan = Q.resolve([Q.rule("*", t, roles=("weight",))], OPS)
    state = {k: dict(s, index=jnp.array([1, 0], jnp.int32)) for k, s in plan.init().items()}
    q = hoist_weights(toy.apply, PARAMS, jnp.zeros((1,) + toy.SHAPE), jnp.zeros((1,)), LABELS[:1], plan.bind(state), 4)
    assert isinstance(q, HoistedWeights) and q.weights["fc1"].shape == (2,) + PARAMS["w1"].shape
    np.testing.assert_array_equal(q.tables["fc1"], [0, 0, 1, 1])
    np.testing.assert_array_equal(_run(plan, state, True), _run(plan, state, False))
    flipped = {k: dict(s, index=jnp.array([0, 1], jnp.int32)) for k, s in state.items()}
    assert not np.array_equal(_run(plan, state, True), _run(plan, flipped, True))  # the group's pick matters


def test_step_classes_and_what_is_not_hoisted():
    table, firsts = step_classes(time_grouped(Q.cast("int8"), num_groups=3, group_len=2).meta, 5)
    np.testing.assert_array_equal(table, [0, 0, 1, 1, 2])
    assert firsts == [0, 2, 4]
    assert step_classes(Q.cast("mx6").meta, 7)[1] == [0]
    assert step_classes(Q.stateless(lambda x, ctx: x * (ctx.step or 1)).meta, 3) is None  # unknown: may read the step
    custom = Q.stateless(lambda x, ctx: x * 2.0)
    plan = Q.resolve([Q.rule("*", custom, roles=("weight",))], OPS)
    q = hoist_weights(toy.apply, PARAMS, jnp.zeros((1,) + toy.SHAPE), jnp.zeros((1,)), LABELS[:1], plan.bind(plan.init()), 4)
    assert not isinstance(q, HoistedWeights)  # nothing hoistable: the plan's own quantizer


def test_vmapped_states_hoist_one_weight_copy_per_point():
    t = selectable(Q.cast("int8", granularity="row"), Q.cast("int2", granularity="row"))
    plan = Q.resolve([Q.rule("*", t, roles=("weight",))], OPS)
    states = Q.stack_states([{k: dict(s, index=jnp.int32(i)) for k, s in plan.init().items()} for i in (0, 1)])
    s = ddim(3)

    def one(st):
        return sample(toy.apply, PARAMS, s, LABELS, sample_keys(0, 4), toy.SHAPE, quant=plan.bind(st))
    swept = np.asarray(jax.jit(jax.vmap(one))(states))
    for i in range(2):
        st = jax.tree.map(lambda a: a[i], states)
        ref = _run(plan, st, False, steps=3)
        scale = float(np.abs(ref).max())
        assert float(np.abs(swept[i] - ref).max()) <= 1e-4 * scale  # a batched vs plain dot: rounding only
    assert not np.allclose(swept[0], swept[1])


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_max_copies_hoists_nothing(bad):
    groups = TimeGroups.from_boundaries((2,))
    plan = Q.resolve([Q.rule("*", time_grouped(Q.cast("int8", granularity="row"), groups), roles=("weight",))], OPS)
    q = hoist_weights(toy.apply, PARAMS, jnp.zeros((1,) + toy.SHAPE), jnp.zeros((1,)), LABELS[:1],
                      plan.bind(plan.init()), 4, max_copies=bad)
    assert not isinstance(q, HoistedWeights)
