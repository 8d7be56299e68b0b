"""Format casts as transforms: dynamic and static scales, the operand's axis, meta, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq import quant as Q
from jdq.quant.casts import CastMeta, cast

from quant_toy import heavy, toy, toy_block

ACT = Q.Context("blocks.0.mlp.fc1", "act", -1)
WEIGHT = Q.Context("blocks.0.mlp.fc1", "weight", -2)


def steps_stats(xs, axis=-1):
    return Q.stack_stats([Q.operand_stats(x, axis) for x in xs])


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mx9", "mx6", "int8", "int4", "fp8_e4m3"])
def test_dynamic_cast_runs_the_format_along_the_operands_axis(fmt):
    w = heavy(0, (64, 48))  # (in, out): contraction axis -2
    t = cast(fmt)
    got = jax.jit(t.apply, static_argnums=2)(w, t.init({}), WEIGHT)
    np.testing.assert_array_equal(got, formats.cast(w, fmt, axis=-2))
    if fmt.startswith("mx"):  # blocks run along the contraction axis, not along the rows
        assert not np.array_equal(got, formats.cast(w, fmt, axis=-1))
    assert t.meta.scaling == ("block" if fmt.startswith("mx") else "dynamic")


def test_static_per_tensor_scale_is_the_calibrated_range_over_steps():
    xs = [heavy(i, (4, 8, 32)) * (i + 1) for i in range(3)]
    t = cast("int8", static=True, granularity="tensor")
    state = t.init(steps_stats(xs))
    amax = max(float(jnp.abs(x).max()) for x in xs)
    # the scale is amax · float32(1/127): two roundings against one for amax / 127, so <= 2 ulps apart
    np.testing.assert_allclose(state["scale"], amax / 127, rtol=2.0**-22)
    assert state["zero"] is None
    # the largest step's data is cast exactly as the dynamic per-tensor cast of that data
    np.testing.assert_array_equal(t.apply(xs[2], state, ACT), formats.cast(xs[2], "int8", granularity="tensor"))
    # smaller steps keep the static (wider) scale: coarser than their own dynamic cast
    assert not np.array_equal(t.apply(xs[0], state, ACT), formats.cast(xs[0], "int8", granularity="tensor"))
    mean = cast("int8", static=True, granularity="tensor", reduce="mean").init(steps_stats(xs))
    # a float32 mean of 3 maxima (γ_3) and the reciprocal multiply (2 ulps) against float64
    np.testing.assert_allclose(mean["scale"], np.mean([float(jnp.abs(x).max()) for x in xs]) / 127,
                               rtol=3 * 2.0**-24 / (1 - 3 * 2.0**-24) + 2.0**-22)


def test_static_asymmetric_per_input_channel_matches_compute_scale():
    xs = [jax.nn.gelu(heavy(10 + i, (16, 24))) for i in range(2)]
    t = cast("int6", static=True, granularity="input_channel", symmetric=False)
    state = t.init(steps_stats(xs))
    both = jnp.concatenate(xs)
    scale, zero = formats.compute_scale(both, "int6", axis=-1, granularity="input_channel", symmetric=False)
    # the same min/max (exact in any order) through the same float32 formula: equal bit for bit
    np.testing.assert_array_equal(state["scale"], scale.reshape(-1))
    np.testing.assert_array_equal(state["zero"], zero.reshape(-1))
    np.testing.assert_array_equal(
        t.apply(xs[1], state, ACT),
        formats.cast(xs[1], "int6", granularity="input_channel", symmetric=False, scale=scale, zero=zero),
    )


def test_static_per_channel_scales_broadcast_along_a_weights_axis():
    w = heavy(3, (32, 16))  # 32 input channels on axis -2
    t = cast("int4", static=True, granularity="input_channel")
    state = t.init(steps_stats([w], axis=-2))
    assert state["scale"].shape == (32,)
    np.testing.assert_allclose(state["scale"], jnp.abs(w).max(1) / 7, rtol=2.0**-22)  # amax·fl(1/7) vs amax/7: 2 ulps
    np.testing.assert_array_equal(t.apply(w, state, WEIGHT), formats.cast(w, "int4", axis=-2, granularity="input_channel"))
    with pytest.raises(ValueError, match="32 static channel scales for 16 channels"):
        t.apply(w, state, ACT)


def test_static_fp8_and_vmap_over_stacked_static_states():
    x = heavy(4, (8, 32))
    t = cast("fp8_e4m3", static=True, granularity="tensor")
    state = t.init(steps_stats([x]))
    np.testing.assert_allclose(state["scale"], jnp.abs(x).max() / 448, rtol=2.0**-22)  # amax·fl(1/448) vs amax/448
    states = Q.stack_states([{"scale": state["scale"] * f, "zero": None} for f in np.linspace(0.5, 4, 8)])
    many = jax.jit(jax.vmap(lambda s: t.apply(x, s, ACT)))(states)
    for i in range(8):
        np.testing.assert_array_equal(many[i], t.apply(x, Q.unstack_state(states, i), ACT))


def test_meta_is_hashable_and_describes_the_cast():
    m = cast("int4", granularity="group", group_size=32).meta
    assert isinstance(m, CastMeta) and hash(m) == hash(cast("int4", granularity="group", group_size=32).meta)
    assert (m.fmt, m.scaling, m.granularity) == ("int4", "dynamic", "group")
    assert m.bits_per_element == pytest.approx(4 + 16 / 32)
    assert dict(m.options) == {"granularity": "group", "group_size": 32}
    assert cast("fp8_e4m3", granularity=None).meta.scaling == "none"
    assert cast("mx9").meta.spec.block_size == 16


def test_bad_casts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="scales come from the data"):
        cast("mx6", static=True)
    with pytest.raises(ValueError, match="granularity 'row'"):
        cast("int8", static=True)
    with pytest.raises(TypeError, match="unknown option"):
        cast("mx6", group_size=4)
    with pytest.raises(ValueError, match="unknown format"):
        cast("int9x")
    with pytest.raises(KeyError, match="absmax"):
        cast("int8", static=True, granularity="tensor").init({})


def test_a_plan_of_casts_quantizes_the_toy_block_as_the_formats_do():
    p, x = toy()
    ops = Q.trace_operands(toy_block, p, x)
    plan = Q.resolve([
        Q.rule("*", cast("int8", granularity="output_channel"), roles="weight"),
        Q.rule("*", cast("int8", granularity="token"), roles=Q.ACTIVATION_ROLES),
        Q.keep_float("attn.*"),
    ], ops)
    got = jax.jit(lambda q: toy_block(p, x, quant=q))(plan.bind(plan.init()))
    # the same model with every linear's weight and input cast by hand
    q = {k: formats.cast(p[k], "int8", axis=-2, granularity="row") for k in ("qkv_w", "proj_w", "fc1_w", "fc2_w")}

    class Manual(Q.QuantizerBase):
        def __call__(self, v, site, role, axis=-1):
            return formats.cast(v, "int8", axis=-1, granularity="row") if role in Q.ACTIVATION_ROLES else v

        def quantizes(self, site, role):
            return role != "q" and role != "k" and role != "v" and role != "attn_prob"

    ref = jax.jit(lambda pp: toy_block(pp, x, quant=Manual()))(dict(p, **q))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # summation order only; a flipped code is >1e-3
    assert not np.allclose(got, toy_block(p, x), atol=1e-4)


@pytest.mark.parametrize("fmt,opts", [("int8", dict(granularity="tensor")), ("int6", dict(granularity="input_channel",
                                                                                        symmetric=False)),
                                      ("fp8_e4m3", dict(granularity="tensor"))])
def test_static_init_refuses_non_finite_statistics(fmt, opts):
    """A NaN or Inf seen in calibration is an error at plan.init, not an all-NaN model at sampling time."""
    xs = [heavy(20, (4, 8, 32)), heavy(21, (4, 8, 32)).at[0, 0, 0].set(jnp.nan)]
    with pytest.raises(ValueError, match="calibration statistics give an invalid scale"):
        cast(fmt, static=True, **opts).init(steps_stats(xs))
    cast(fmt, static=True, **opts).init(steps_stats(xs[:1]))  # finite statistics: fine
