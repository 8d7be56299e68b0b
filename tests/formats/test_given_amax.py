"""The elementwise "given amax" casts a kernel calls once it has reduced a block (MX, SMX) or a row (FP8) itself
equal the formats' own fake quantization bit for bit, on inputs with NaN, ±Inf, zeros and subnormals."""

import jax.numpy as jnp
import numpy as np
import pytest

from jdq import formats
from jdq.formats import _bits, fp8, mx, smx


def _inputs(seed, shape=(6, 64)):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32) * np.exp2(rng.integers(-20, 20, size=shape))
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, 40, replace=False)
    flat[idx] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-39, 2.0**-126, 448.0, 0.5], idx.size)
    a[0] = 0.0
    a[1] = np.abs(a[1])  # one row without NaN / Inf of each sign pattern
    a[1, ~np.isfinite(a[1])] = 1.0
    return jnp.asarray(a)


def _block_amax_bits(x, block):
    """Each element's block max |x| bits (int32, x's shape), blocks of ``block`` along the last axis."""
    n = x.shape[-1]
    b = _bits.abs_bits(x.astype(jnp.float32)).reshape(x.shape[:-1] + (n // block, block))
    return jnp.broadcast_to(b.max(axis=-1, keepdims=True), b.shape).reshape(x.shape)


def _assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mxfp8_e5m2"])
def test_mx_given_amax_equals_fake_quantize(name):
    spec = formats.get(name)
    x = _inputs(0)
    got = mx.fake_quantize_given_amax(x, _block_amax_bits(x, spec.block_size), spec)
    _assert_same(got, formats.cast(x, spec, axis=-1))


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4"])
def test_smx_given_amax_equals_fake_quantize(name):
    spec = formats.get(name)
    x = _inputs(1)
    partner = x.reshape(6, 32, 2)[..., ::-1].reshape(6, 64)
    got = smx.fake_quantize_given_amax(x, partner, _block_amax_bits(x, spec.block_size), spec)
    _assert_same(got, formats.cast(x, spec, axis=-1))
    with pytest.raises(ValueError, match="sub_block_size must be 2"):
        smx.fake_quantize_given_amax(x, partner, _block_amax_bits(x, 16), formats.get("mx6", sub_block_size=4))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_given_amax_equals_the_dynamic_row_cast(name):
    spec = formats.get(name, granularity="row")
    x = _inputs(2)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    _assert_same(fp8.fake_quantize_given_amax(x, amax, spec), formats.cast(x, spec, axis=-1))
    with pytest.raises(ValueError, match="unscaled"):
        fp8.fake_quantize_given_amax(x, amax, formats.get(name, granularity=None))
