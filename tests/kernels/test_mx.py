"""MX block-scaled GEMM (MXFP8, MXINT8): reference == fake-quant product, GPU kernel in interpret mode
bit-exact with the reference, the real kernel lowers to Mosaic GPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import assert_within_reordering_bound, dyadic, lowers_to_mosaic_gpu, relerr

from jdq import formats
from jdq.kernels.mx import ref
from jdq.kernels.mx.gpu import Config, mx_matmul_gpu


def _operands(m=64, k=256, n=128):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    # blocks of very different magnitude along K: the block scales matter
    x = jax.random.normal(k1, (m, k)) * (2.0 ** jax.random.randint(k3, (m, k // 32), -8, 8)).repeat(32, 1)
    w = jax.random.normal(k2, (n, k))
    return x, w, dyadic(k4, (n,))


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8"])
def test_reference_equals_fake_quant(fmt):
    x, w, b = _operands()
    xq, xs = ref.quantize_operand(x, fmt)
    wq, ws = ref.quantize_operand(w, fmt)
    got = ref.mx_matmul(xq, xs, wq, ws, b, jnp.float32)
    fake = jnp.matmul(formats.cast(x, fmt, axis=-1), formats.cast(w, fmt, axis=-1).T, precision="highest") + b
    assert relerr(got, fake) < 1e-6


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8"])
def test_gpu_kernel_interpret_equals_reference(fmt):
    x, w, b = _operands()
    xq, xs = ref.quantize_operand(x, fmt)
    wq, ws = ref.quantize_operand(w, fmt)
    got = mx_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, Config(64, 128, 4, 2), interpret=True)
    want = ref.mx_matmul(xq, xs, wq, ws, b, jnp.float32)
    # Products are exact in float32, but the kernel and the reference add the K products (and the
    # bias) in different orders, so they agree only to the reordering bound of a float sum.
    x_abs = np.abs(np.asarray(formats.cast(x, fmt, axis=-1), np.float64))
    w_abs = np.abs(np.asarray(formats.cast(w, fmt, axis=-1), np.float64))
    abs_sum = x_abs @ w_abs.T + np.abs(np.asarray(b, np.float64))
    assert_within_reordering_bound(got, want, abs_sum, x.shape[1] + 1)
    assert relerr(got, want) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_gpu_kernel_lowers_to_mosaic_gpu(dtype):
    m, k, n = 4096, 1152, 1152
    assert lowers_to_mosaic_gpu(mx_matmul_gpu, ((m, k), dtype), ((k // 32, m), jnp.float32), ((n, k), dtype),
                                ((k // 32, n), jnp.float32), ((n,), jnp.float32))


def test_block_scales_and_errors():
    s = ref.block_scales(jnp.array([127, 130, 0], jnp.uint8), "mxfp8_e4m3")
    np.testing.assert_array_equal(np.asarray(s), [1.0, 8.0, 0.0])
    assert float(ref.block_scales(jnp.array([127], jnp.uint8), "mxint8")[0]) == 2.0**-6
    with pytest.raises(ValueError, match="fmt must be one of"):
        ref.quantize_operand(jnp.ones((4, 32)), "mxfp4_e2m1")
    with pytest.raises(ValueError, match="do not fit blocks"):
        ref.mx_matmul(jnp.zeros((4, 48), jnp.int8), jnp.ones((1, 4)), jnp.zeros((4, 48), jnp.int8), jnp.ones((1, 4)))
