"""jdq.quant.select: a transform whose state picks the option, alone and under vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq import quant as Q
from jdq.quant.select import selectable, set_index


def test_selectable_applies_the_chosen_option_and_vmaps():
    x = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    t = selectable(None, Q.cast("int8", granularity="row"), Q.cast("mx6"))
    ctx = Q.Context("blocks.0.mlp.fc1", "act", -1)
    st = t.init({})
    want = [x, formats.cast(x, "int8", axis=-1, granularity="row"), formats.cast(x, "mx6", axis=-1)]
    for k in range(3):
        got = t.apply(x, dict(st, index=jnp.int32(k)), ctx)
        # the chosen branch is the same function on the same input, so the values are the cast's own
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want[k]))
    stacked = Q.stack_states([dict(st, index=jnp.int32(k)) for k in (2, 0, 1)])
    got = jax.vmap(lambda s: t.apply(x, s, ctx))(stacked)
    for row, k in enumerate((2, 0, 1)):  # vmapped switch evaluates every branch and selects: values copied
        np.testing.assert_array_equal(np.asarray(got[row]), np.asarray(want[k]))


def test_set_index_and_bad_options():
    ops = [Q.Operand("a", "act", (2, 8), jnp.float32, -1), Q.Operand("b", "act", (2, 8), jnp.float32, -1)]
    plan = Q.resolve([Q.rule("*", selectable(None, Q.cast("mx9")))], ops)
    st = set_index(plan.init(), ["b:act"], 1)
    assert int(st["a:act"]["index"]) == 0 and int(st["b:act"]["index"]) == 1
    with pytest.raises(ValueError, match="at least one option"):
        selectable()
    with pytest.raises(TypeError, match="option 1"):
        selectable(None, "int8")
    with pytest.raises(ValueError, match="default 3"):
        selectable(None, default=3)
