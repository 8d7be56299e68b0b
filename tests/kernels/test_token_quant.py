"""One-pass per-token quantization: reference == jdq.formats, GPU kernel in interpret mode bit-exact,
the real kernel lowers to Mosaic GPU at the benchmark shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu

from jdq import formats
from jdq.kernels.token_quant.gpu import Config, quantize_rows_gpu
from jdq.kernels.token_quant.ref import quantize_rows


def _x(shape, dtype=jnp.float32, key=0):
    x = jax.random.normal(jax.random.key(key), shape) * jnp.linspace(0.05, 40.0, shape[-1])
    return x.at[1].set(0.0).astype(dtype)  # one all-zero row: scale clamps, codes are zero


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_reference_is_the_fake_quant_cast(fmt):
    x = _x((32, 256))
    q, s = quantize_rows(x, fmt)
    assert q.dtype == (jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn) and s.shape == (32,)
    deq = q.astype(jnp.float32) * s[:, None]
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(formats.cast(x, fmt, axis=-1, granularity="row")))
    assert not bool(jnp.any(q[1].astype(jnp.float32)))
    top = 127.0 if fmt == "int8" else 448.0
    assert float(jnp.abs(q.astype(jnp.float32)).max()) == top


@pytest.mark.parametrize("fmt,dtype", [("int8", jnp.bfloat16), ("fp8_e4m3", jnp.bfloat16), ("int8", jnp.float32)])
def test_gpu_kernel_interpret_bit_exact(fmt, dtype):
    x = _x((32, 256), dtype, key=1)
    q, s = quantize_rows_gpu(x, fmt, Config(smem_bytes=8 * 1024), interpret=True)  # 8 rows per CTA: 4 CTAs
    q_ref, s_ref = quantize_rows(x, fmt)
    assert q.dtype == q_ref.dtype
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), np.asarray(q_ref.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))


def test_rows_per_cta_follow_the_budget():
    cfg = Config()
    assert cfg.rows(4096, 1152, 2) == 16 and cfg.rows(4096, 4608, 2) == 4
    assert cfg.rows(8, 1152, 2) == 8  # never more rows than M allows
    assert not cfg.supports(4096, 1000) and not cfg.supports(6, 1152)


@pytest.mark.parametrize("fmt,m,k", [("int8", 4096, 1152), ("int8", 8192, 4608), ("fp8_e4m3", 4096, 4608)])
def test_gpu_kernel_lowers_to_mosaic_gpu(fmt, m, k):
    assert lowers_to_mosaic_gpu(functools.partial(quantize_rows_gpu, fmt=fmt), ((m, k), jnp.bfloat16))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_rows(jnp.ones((4, 8)), "int4")
    with pytest.raises(ValueError, match="do not fit"):
        quantize_rows_gpu(jnp.ones((8, 100), jnp.bfloat16), interpret=True)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        quantize_rows_gpu(jnp.ones((8, 128), jnp.float16), interpret=True)
