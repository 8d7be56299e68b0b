"""MixDiT mixed GEMM: the operand encodings equal the plan's fake-quant outlier split; the GPU kernel in
interpret mode equals the reference; the real kernel lowers to Mosaic GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu, relerr

from jdq.kernels.mixdit import ref
from jdq.kernels.mixdit.gpu import Config, mixdit_matmul_gpu
from jdq.quant import Context
from jdq.quant.outliers import channel_permutation, outlier_split, outlier_weight
from jdq.quant.casts import cast

K, N, M = 384, 128, 64


@pytest.fixture(scope="module")
def operands():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    col = jnp.where(jnp.arange(K) % 29 == 3, 30.0, 1.0)  # a few outlier channels
    x = jax.random.normal(k1, (M, K)) * col
    w = jax.random.normal(k2, (K, N)) / 16
    b = jax.random.normal(k3, (N,))
    stats = {"absmax_channel": jnp.abs(x).max(0), "act_absmax_channel": jnp.abs(x).max(0)}
    split = outlier_split(0.05, hi="mx9", lo="mx6", granularity="channel")
    wt = outlier_weight(cast("mx6"), 0.05, channel_multiple=16)
    a_state, w_state = split.init(stats), wt.init(stats)
    perm = channel_permutation(w_state, 16)
    k_hi = round(0.05 * K / 16) * 16  # the outlier count of outlier_split (multiple of 16)
    return x, w, b, split, wt, a_state, w_state, perm, k_hi


def test_encodings_equal_the_fake_quant_split(operands):
    x, w, b, split, wt, a_state, w_state, perm, k_hi = operands
    assert k_hi == 16
    x_hi, x_lo, s_x = ref.quantize_activation(x, perm, k_hi)
    assert x_hi.shape == (M, 64) and x_lo.shape == (M, 384) and x_lo.dtype == jnp.float8_e4m3fn
    fake_x = split.apply(x, a_state, Context("s", "act", -1))
    xp = jnp.take(fake_x, perm, axis=-1)
    np.testing.assert_array_equal(np.asarray(x_hi[:, :k_hi], np.float32), np.asarray(xp[:, :k_hi]))
    np.testing.assert_array_equal(np.asarray(x_lo[:, : K - k_hi].astype(jnp.float32) * s_x[:, None]), np.asarray(xp[:, k_hi:]))
    assert bool(jnp.all(ref.lo_is_exact(xp[:, k_hi:])))
    assert not bool(jnp.any(x_lo[:, K - k_hi:].astype(jnp.float32)))  # zero padding
    w_hi, w_lo, s_w, deq = ref.pack_weight(w, perm, k_hi)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(wt.apply(w, w_state, Context("s", "weight", -2))))
    got = ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, jnp.float32)
    assert relerr(got, fake_x @ deq + b) < 1e-6


@pytest.mark.parametrize("lo", ["mx6", "mx4", "mxfp6_e2m3"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_is_the_e4m3_re_encoding_of_the_cast_values(lo, dtype):
    """quantize_activation's lo operand == E4M3 re-encoding of the cast values, on adversarial rows."""
    from jdq import formats

    rng = np.random.default_rng(1)
    a = rng.standard_normal((24, 256)).astype(np.float32) * np.exp2(rng.integers(-40, 40, size=(24, 1)))
    a *= np.exp2(rng.integers(-6, 6, size=(1, 256)))  # blocks several binades apart within a row
    a[0] = 0.0  # all-zero row
    a[1, :] = 1e-39  # all subnormal: flushed
    a[2, 5], a[3, 9], a[4, 17] = np.nan, np.inf, -np.inf
    a[5, :] = rng.choice([0.9995, -0.9999, 1.0, 127.5, 2.0**-126], 256)  # rounding near the binade edge
    x = jnp.asarray(a).astype(dtype)
    perm, k_hi = jnp.asarray(rng.permutation(256)), 32
    x_hi, x_lo, s_x = jax.jit(ref.quantize_activation, static_argnums=(2, 3, 4))(x, perm, k_hi, "mx9", lo)
    v = formats.cast(jnp.take(x, perm, axis=-1).astype(jnp.float32)[:, k_hi:], lo, axis=-1)
    want_lo, want_s = ref.to_e4m3_rows(v)
    finite = np.isfinite(np.asarray(x, np.float32)).all(axis=1)
    assert finite.sum() == 21
    np.testing.assert_array_equal(np.asarray(s_x)[finite], np.asarray(want_s)[finite])
    got = np.asarray(x_lo[:, : 256 - k_hi].astype(jnp.float32))
    np.testing.assert_array_equal(got[finite], np.asarray(want_lo.astype(jnp.float32))[finite])
    # a row with NaN / ±Inf input holds a NaN code either way, so its GEMM output row is all NaN
    assert np.isnan(np.concatenate([got, np.asarray(x_hi, np.float32)], axis=1)[~finite]).any(axis=1).all()


def test_lo_exactness_condition():
    # a 4-bit magnitude whose last bit lies 2^-20 below the row max cannot be an E4M3 value at 2^-7 scale
    v = jnp.array([[1.0, 15 * 2.0**-20, 0.0], [1.0, 15 * 2.0**-16, 0.5]])
    np.testing.assert_array_equal(np.asarray(ref.lo_is_exact(v)), [False, True])


@pytest.mark.parametrize("k_hi", [16, 0])
def test_gpu_kernel_interpret_equals_reference(operands, k_hi):
    x, w, b, *_, perm, _ = operands
    x_hi, x_lo, s_x = ref.quantize_activation(x, perm, k_hi)
    w_hi, w_lo, s_w, _ = ref.pack_weight(w, perm, k_hi)
    got = mixdit_matmul_gpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, jnp.float32, Config(64, 128, 2), interpret=True)
    want = ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, jnp.float32)
    assert relerr(got, want) < 1e-6  # exact products; float32 sums in another order


@pytest.mark.parametrize("k_hi", [64, 0])
def test_gpu_kernel_lowers_to_mosaic_gpu(k_hi):
    m, k_lo, n = 4096, 1152, 3456
    assert lowers_to_mosaic_gpu(mixdit_matmul_gpu, ((m, k_hi), jnp.bfloat16), ((m, k_lo), jnp.float8_e4m3fn),
                                ((m,), jnp.float32), ((n, k_hi), jnp.bfloat16), ((n, k_lo), jnp.float8_e4m3fn),
                                ((n,), jnp.float32), ((n,), jnp.float32))


def test_bad_operands_raise(operands):
    x, w, b, *_, perm, k_hi = operands
    x_hi, x_lo, s_x = ref.quantize_activation(x, perm, k_hi)
    w_hi, w_lo, s_w, _ = ref.pack_weight(w, perm, k_hi)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        mixdit_matmul_gpu(x_hi, x_lo.astype(jnp.bfloat16), s_x, w_hi, w_lo, s_w, interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        mixdit_matmul_gpu(x_hi[:, :16], x_lo, s_x, w_hi[:, :16], w_lo, s_w, interpret=True)
