"""LayerNorm + adaLN modulation + per-token quantization: reference == the model's ops + token quantization,
the GPU kernel in interpret mode bit-exact with the reference, the real kernel lowers to Mosaic GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu

from jdq.kernels.norm_quant.gpu import Config, norm_quantize_rows_gpu
from jdq.kernels.norm_quant.ref import modulated_norm, norm_quantize_rows
from jdq.kernels.token_quant.ref import quantize_rows
from jdq.models.layers import layer_norm, modulate


def _operands(m, k, group_rows, dtype, key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    x = (jax.random.normal(k1, (m, k)) * 3 + jnp.linspace(-2, 2, k)).astype(dtype)
    g = m // group_rows
    shift = (jax.random.normal(k2, (g, k)) * 0.5).astype(dtype)
    scale = (jax.random.normal(k3, (g, k)) * 0.5).astype(dtype)
    return x, shift, scale


def test_reference_is_the_model_norm_in_float32():
    # float32: the model's layer_norm + modulate round nothing in between, so only the summation
    # order of mean / variance can differ: a few float32 ulps of h (|h| <~ 20 here).
    x, shift, scale = _operands(32, 256, 16, jnp.float32)
    want = modulate(layer_norm(x.reshape(2, 16, 256)), shift, scale).reshape(32, 256)
    np.testing.assert_allclose(np.asarray(modulated_norm(x, shift, scale, 16)), np.asarray(want), rtol=0, atol=2e-5)
    q, s = norm_quantize_rows(x, shift, scale, 16)
    q2, s2 = quantize_rows(modulated_norm(x, shift, scale, 16))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q2))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))


@pytest.mark.parametrize("fmt,dtype,reg_elems", [("int8", jnp.bfloat16, 96), ("fp8_e4m3", jnp.bfloat16, 96),
                                                 ("int8", jnp.float32, 96), ("int8", jnp.bfloat16, 0)])
def test_gpu_kernel_interpret_matches_reference(fmt, dtype, reg_elems):
    # 8 rows per CTA (4 CTAs, 2 samples); reg_elems=0: the shared-memory passes instead of registers
    x, shift, scale = _operands(32, 256, 16, dtype, key=1)
    cfg = Config(smem_bytes=8 * 1024, reg_elems=reg_elems)
    q, s = norm_quantize_rows_gpu(x, shift, scale, 16, fmt=fmt, config=cfg, interpret=True)
    q2, s2 = norm_quantize_rows(x, shift, scale, 16, fmt=fmt)
    assert q.dtype == q2.dtype
    if dtype == jnp.bfloat16:  # h rounded to bf16 once: the float32 sums' order rarely moves it
        np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), np.asarray(q2.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))
    else:  # float32 h differs by summation order only: a code moves by at most one step, rarely
        d = np.abs(np.asarray(q, np.float32) - np.asarray(q2, np.float32))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3
        np.testing.assert_allclose(np.asarray(s), np.asarray(s2), rtol=1e-6)


def test_rows_per_cta_stay_inside_a_sample():
    cfg = Config()
    assert cfg.rows(16384, 1152, 2, 256) == 16
    assert cfg.rows(16384, 1152, 2, 8) == 8
    assert not cfg.supports(16384, 1152, 2, 6)  # 6 tokens per sample: no power-of-two row block


@pytest.mark.parametrize("fmt,m,k,group", [("int8", 16384, 1152, 256), ("fp8_e4m3", 4096, 1152, 4096)])
def test_gpu_kernel_lowers_to_mosaic_gpu(fmt, m, k, group):
    fn = functools.partial(norm_quantize_rows_gpu, group_rows=group, fmt=fmt)
    g = m // group
    assert lowers_to_mosaic_gpu(fn, ((m, k), jnp.bfloat16), ((g, k), jnp.bfloat16), ((g, k), jnp.bfloat16))


def test_bad_inputs_raise():
    x = jnp.ones((32, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="whole number of groups"):
        norm_quantize_rows(x, jnp.ones((3, 128)), jnp.ones((3, 128)), 5)
    with pytest.raises(ValueError, match="one row per sample"):
        norm_quantize_rows(x, jnp.ones((2, 128)), jnp.ones((2, 128)), 8)
    with pytest.raises(ValueError, match="do not fit"):
        norm_quantize_rows_gpu(jnp.ones((32, 100), jnp.bfloat16), jnp.ones((2, 100)), jnp.ones((2, 100)), 16,
                               interpret=True)
