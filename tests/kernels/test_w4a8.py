"""W4A8: reference == fake-quant path, GPU kernel in interpret mode bit-exact (power-of-two scales),
the real kernel lowers to Mosaic GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import assert_within_reordering_bound, dyadic, lowers_to_mosaic_gpu, pow2

from jdq import formats
from jdq.kernels.w4a8 import ref
from jdq.kernels.w4a8.gpu import Config, w4a8_matmul_gpu
from jdq.kernels.weight_only.ref import pack_int4


@pytest.mark.parametrize("group", [None, 64])
def test_reference_equals_fake_quant(group):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (48, 256)) * 3
    w = jax.random.normal(k2, (256, 128)) / 16  # (K, N)
    b = jax.random.normal(k3, (128,))
    opts = dict(granularity="group", group_size=group) if group else dict(granularity="row")
    qt = formats.quantize(w, "int4", axis=-2, **opts)
    scale = jnp.maximum(qt.scale, 2.0**-126)
    scale = scale.T if group else scale.reshape(128, 1)
    got = ref.w4a8_linear(x, pack_int4(qt.codes.T), scale, b, group)
    xh, wh = formats.cast(x, "int8", axis=-1, granularity="row"), formats.cast(w, "int4", axis=-2, **opts)
    fake = xh @ wh + b
    # the kernel's integer dot is exact, then two scale multiplies and the bias add; the fake path sums the
    # K float32 products and the bias: both within the float32 summation bound of K + 3 terms
    abs_sum = np.abs(np.asarray(xh, np.float64)) @ np.abs(np.asarray(wh, np.float64)) + np.abs(np.asarray(b, np.float64))
    assert_within_reordering_bound(got, fake, abs_sum, x.shape[1] + 3)


@pytest.mark.parametrize("kind", ["smem", "rega"])
@pytest.mark.parametrize("group", [None, 64, 128])
def test_gpu_kernel_interpret_bit_exact(group, kind):
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(2), 5)
    m, k, n = 64, 256, 128
    xq = jax.random.randint(k1, (m, k), -127, 128, jnp.int8)
    packed = pack_int4(jax.random.randint(k2, (n, k), -7, 8).astype(jnp.int8))
    xs = pow2(k3, (m,))
    ws = pow2(k4, (n, 1 if group is None else k // group))
    b = dyadic(k5, (n,))
    cfg = Config(64, 128, 2) if kind == "smem" else Config(64, 64, 2, kind="rega")  # rega computes yᵀ (N tiles of 64)
    got = w4a8_matmul_gpu(xq, xs, packed, ws, b, group, jnp.float32, cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.w4a8_matmul(xq, xs, packed, ws, b, group, jnp.float32)))


@pytest.mark.parametrize("kind", ["smem", "rega"])
@pytest.mark.parametrize("group", [None, 64, 128])
def test_gpu_kernel_lowers_to_mosaic_gpu(group, kind):
    """Both kernels lower; "rega" issues int8 WGMMAs with the unpacked weight as the register A operand."""
    m, k, n = 4096, 1152, 3456
    g = 1 if group is None else k // group
    cfg = Config() if kind == "smem" else Config(128, 64, 4, kind="rega")
    f = functools.partial(w4a8_matmul_gpu, group_size=group, config=cfg)
    assert lowers_to_mosaic_gpu(f, ((m, k), jnp.int8), ((m,), jnp.float32), ((n, k // 2), jnp.int8),
                                ((n, g), jnp.float32), ((n,), jnp.float32))


def test_bad_shapes_raise():
    xq = jnp.zeros((64, 256), jnp.int8)
    with pytest.raises(ValueError, match="does not fit activation"):
        w4a8_matmul_gpu(xq, jnp.ones(64), jnp.zeros((128, 100), jnp.int8), jnp.ones((128, 1)), interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        w4a8_matmul_gpu(xq, jnp.ones(64), jnp.zeros((128, 128), jnp.int8), jnp.ones((128, 8)), group_size=32, interpret=True)


def test_tuned_config_fits_dit_shapes():
    """The H200 row (register-A kernel) fits every DiT-XL/2 linear at the group sizes the kernel takes."""
    from jdq.kernels import tuning

    cfg = Config(**tuning.lookup("w4a8", 8192, "NVIDIA H200"))
    assert cfg.kind == "rega"
    for n, k in ((3456, 1152), (1152, 4608), (4608, 1152), (1152, 1152)):
        for group in (64, 128, k):
            assert cfg.supports(8192, n, k, group), (n, k, group)
    assert Config(**tuning.lookup("w4a8", 8192, "unknown GPU")).kind == "smem"
