"""Number formats on hostile input: ranges near float32's limit, invalid static scales, empty axes,
float64 input. Each case gives a clear ValueError or the behaviour the module docstrings document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats as F

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("row", [[-3.4e38, 0.0, 1.0, 3.4e38], [-F32_MAX, F32_MAX, 1.0, -1.0], [-F32_MAX, -F32_MAX, 0.0, 0.0]])
def test_asymmetric_range_wider_than_float32_stays_finite(fmt, row):
    """x_max - x_min overflows float32 here; the scale is computed without the overflow (was: all NaN)."""
    x = jnp.array([row], jnp.float32)
    y = np.asarray(F.cast(x, fmt, symmetric=False), np.float64)
    scale, zero = F.compute_scale(x, fmt, symmetric=False)
    s = float(np.asarray(scale).ravel()[0])
    assert np.isfinite(s) and np.isfinite(np.asarray(zero)).all() and np.isfinite(y).all()
    # an element within the range is at most one step from its value (half a step from rounding,
    # up to another half from the zero point's rounding); clipping at ±max only moves it closer
    assert np.all(np.abs(y - np.asarray(row, np.float64)) <= s)
    qt = F.quantize(x, fmt, symmetric=False)
    np.testing.assert_array_equal(np.asarray(F.dequantize(qt)), np.asarray(y, np.float32))


def test_asymmetric_ordinary_ranges_keep_their_bits():
    """The overflow guard changes no bit of an ordinary cast: the same values as (max - min)·(1/qmax)."""
    x = jax.random.normal(jax.random.key(0), (64, 96)) * 3 + 0.5
    scale, zero = F.compute_scale(x, "int4", symmetric=False)
    lo = np.minimum(np.asarray(x).min(-1, keepdims=True), 0)
    hi = np.maximum(np.asarray(x).max(-1, keepdims=True), 0)
    np.testing.assert_array_equal(np.asarray(scale), (hi - lo).astype(np.float32) * np.float32(1 / 15))


def test_nan_and_inf_groups_stay_nan():
    x = jnp.array([[np.nan, 1.0, 2.0, 3.0], [np.inf, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
    for sym in (True, False):
        y = np.asarray(F.cast(x, "int8", symmetric=sym))
        assert np.isnan(y[:2]).all() and np.isfinite(y[2]).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_invalid_static_scale_is_an_error(fmt, bad):
    x = jnp.ones((2, 4))
    scale = jnp.array([[0.1], [bad]])
    with pytest.raises(ValueError, match="static scale has 1 invalid value"):
        F.cast(x, fmt, scale=scale)
    with pytest.raises(ValueError, match="static scale has 1 invalid value"):
        F.quantize(x, fmt, scale=scale)


def test_invalid_static_zero_point_is_an_error():
    with pytest.raises(ValueError, match="zero point has 1 NaN or Inf"):
        F.cast(jnp.ones((2, 4)), "int8", symmetric=False, scale=jnp.full((2, 1), 0.1), zero=jnp.array([[3.0], [np.nan]]))


def test_zero_static_scale_is_the_all_zero_group_scale():
    """Documented: 0 is accepted (compute_scale's scale of an all-zero group) and applied as 2**-126."""
    x = jnp.zeros((2, 4)).at[1].set(1.0)
    scale, _ = F.compute_scale(x, "int8")
    assert float(scale[0, 0]) == 0.0
    y = F.cast(x, "int8", scale=scale)  # passing the dynamic scale back reproduces the dynamic cast
    np.testing.assert_array_equal(np.asarray(y), np.asarray(F.cast(x, "int8")))
    np.testing.assert_array_equal(np.asarray(y[0]), 0.0)


def test_traced_static_scale_is_not_checked_inside_jit():
    """Documented: a traced scale cannot be inspected; NaN propagates to the output (never silently finite)."""
    f = jax.jit(lambda s: F.cast(jnp.ones((2, 4)), "int8", scale=s))
    assert np.isnan(np.asarray(f(jnp.full((2, 1), np.nan)))).all()


@pytest.mark.parametrize("fmt,opts", [("int8", {}), ("int4", dict(granularity="group", group_size=2)),
                                      ("fp8_e4m3", {}), ("mxfp8_e4m3", {}), ("mx6", {})])
def test_empty_quantized_axis_is_an_error(fmt, opts):
    x = jnp.ones((3, 0))
    with pytest.raises(ValueError, match="axis -1: it is empty"):
        F.cast(x, fmt, axis=-1, **opts)
    with pytest.raises(ValueError, match="axis -1: it is empty"):
        F.quantize(x, fmt, axis=-1, **opts)


def test_empty_batch_is_fine_but_an_empty_tensor_scale_is_an_error():
    assert F.cast(jnp.ones((0, 4)), "int8").shape == (0, 4)  # per-row scales of no rows
    with pytest.raises(ValueError, match="'tensor' scale of an empty array"):
        F.cast(jnp.ones((0, 4)), "int8", granularity="tensor")
    with pytest.raises(ValueError, match="axis 1: it is empty"):
        F.compute_scale(jnp.ones((2, 0)), "int8")


def test_float64_input_dtype_is_documented():
    """Without jax_enable_x64 a float64 input is float32 on entry and comes back float32; with it, float64."""
    x = np.linspace(-1, 1, 8).reshape(2, 4)
    assert F.cast(x, "int8").dtype == jnp.float32
    with jax.enable_x64(True):
        y = F.cast(x, "int8")
        assert y.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(y), np.asarray(F.cast(x.astype(np.float32), "int8"), np.float64))
