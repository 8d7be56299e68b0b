"""W4A8 Pallas TPU kernel in interpret mode on CPU against the reference: bit-exact at every
accepted tile size with power-of-two scales, and with any scales where no multiply-add can be
contracted; within the FMA-contraction bound otherwise; it cross-lowers to Mosaic TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import dyadic, pow2

from jdq.kernels.w4a8 import ref
from jdq.kernels.w4a8.tpu import w4a8_matmul_tpu
from jdq.kernels.weight_only.ref import pack_int4

M, K, N = 64, 512, 256


def _operands(key, group, pow2_scales, m=M, k=K, n=N):
    """int8 activations and their scales (M,), int4 codes (N, K) and their packing, scales (N, G), bias."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    xq = jax.random.randint(k1, (m, k), -127, 128).astype(jnp.int8)
    codes = jax.random.randint(k2, (n, k), -7, 8).astype(jnp.int8)
    g = 1 if group is None else k // group
    if pow2_scales:
        xs, ws, b = pow2(k3, (m,)), pow2(k4, (n, g)), dyadic(k5, (n,))
    else:
        xs = jax.random.uniform(k3, (m,), minval=1e-3, maxval=2e-2)
        ws = jax.random.uniform(k4, (n, g), minval=1e-3, maxval=1e-2)
        b = jax.random.normal(k5, (n,))
    assert np.any(np.asarray(xq) != 0) and np.any(np.asarray(codes) != 0)
    return xq, xs, codes, pack_int4(codes), ws, b


def _magnitude(xq, xs, codes, ws, b, group):
    """Σ_g |P_g| s_w[g] s_x + |b| in float64, ``P_g`` the exact group products: the scale of the rounding bound."""
    x, c = np.asarray(xq, np.int64), np.asarray(codes, np.int64)
    gs = x.shape[1] if group is None else group
    ws = np.asarray(ws, np.float64)
    mag = sum(np.abs(x[:, g * gs:(g + 1) * gs] @ c[:, g * gs:(g + 1) * gs].T) * ws[:, g] for g in range(ws.shape[1]))
    return mag * np.asarray(xs, np.float64)[:, None] + (0 if b is None else np.abs(np.asarray(b, np.float64)))


# (group (None: per channel), tk): several groups per K step, one per step, a group over several steps
TILINGS = [(None, 128), (None, 512), (64, 256), (64, 128), (128, 128), (128, 512), (256, 128)]


@pytest.mark.slow
@pytest.mark.parametrize("group,tk", TILINGS)
def test_interpret_bit_exact_pow2_scales(group, tk):
    """Power-of-two scales make every float product exact: the kernel equals the reference bit for bit."""
    xq, xs, _, packed, ws, b = _operands(jax.random.key(tk + (group or 0)), group, pow2_scales=True)
    for bias, out in ((b, jnp.float32), (None, jnp.bfloat16)):
        got = w4a8_matmul_tpu(xq, xs, packed, ws, bias, group, out, tm=32, tn=128, tk=tk, interpret=True)
        want = ref.w4a8_matmul(xq, xs, packed, ws, bias, group, out)
        assert got.dtype == out
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("tk", [128, 512])
def test_interpret_bit_exact_per_channel_any_scales(tk):
    """Per channel without bias the epilogue is ``float32(acc) · s_x · s_w`` (no add to contract): bit-exact."""
    xq, xs, _, packed, ws, _ = _operands(jax.random.key(10 + tk), None, pow2_scales=False)
    got = w4a8_matmul_tpu(xq, xs, packed, ws, None, None, jnp.float32, tm=32, tn=128, tk=tk, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.w4a8_matmul(xq, xs, packed, ws, None, None,
                                                                              jnp.float32)))


@pytest.mark.parametrize("group,tk", [(None, 256), (64, 256), (256, 128)])
def test_interpret_any_scales_within_fma_bound(group, tk):
    """Any float32 scales: the reference's operations in its order; the compiler may contract ``c + P·s`` into an
    FMA (XLA:CPU does, in jitted code), so |kernel − ref| ≤ 2·γ_{G+3}·(Σ|P_g| s_g s_x + |b|)."""
    xq, xs, codes, packed, ws, b = _operands(jax.random.key(20 + tk + (group or 0)), group, pow2_scales=False)
    g = ws.shape[1]
    gamma = (g + 3) * 2.0**-24 / (1 - (g + 3) * 2.0**-24)
    bound = 2 * gamma * _magnitude(xq, xs, codes, ws, b, group)
    got = np.asarray(w4a8_matmul_tpu(xq, xs, packed, ws, b, group, jnp.float32, tm=32, tn=128, tk=tk, interpret=True))
    want = np.asarray(ref.w4a8_matmul(xq, xs, packed, ws, b, group, jnp.float32))
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(want).max() > 1  # not a vacuous comparison


def test_default_tiles_shrink():
    """Defaults (256, 256, 512) shrink to a (32, 256) × (128, 256) problem."""
    xq, xs, _, packed, ws, b = _operands(jax.random.key(30), 128, pow2_scales=True, m=32, k=256, n=128)
    got = w4a8_matmul_tpu(xq, xs, packed, ws, b, 128, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref.w4a8_matmul(xq, xs, packed, ws, b, 128),
                                                                          np.float32))


def test_jit_and_vmap_of_a_caller():
    """Inside a user's jit (and vmap over a batch of activations) the kernel gives the reference's values."""
    xq, xs, _, packed, ws, b = _operands(jax.random.key(31), 64, pow2_scales=True, m=32, k=256, n=128)
    call = functools.partial(w4a8_matmul_tpu, group_size=64, out_dtype=jnp.float32, tm=16, tn=128, tk=128,
                             interpret=True)
    want = np.asarray(ref.w4a8_matmul(xq, xs, packed, ws, b, 64, jnp.float32))
    got = jax.jit(lambda *a: call(*a) * 2)(xq, xs, packed, ws, b)
    np.testing.assert_array_equal(np.asarray(got), want * 2)
    got_b = jax.jit(jax.vmap(call, in_axes=(0, 0, None, None, None)))(jnp.stack([xq, -xq]), jnp.stack([xs, xs]),
                                                                      packed, ws, b)
    want_neg = ref.w4a8_matmul(-xq, xs, packed, ws, b, 64, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got_b[1]), np.asarray(want_neg))


def test_bad_shapes_raise():
    xq, xs, _, packed, ws, b = _operands(jax.random.key(32), 128, pow2_scales=True, m=48, k=768, n=128)
    with pytest.raises(ValueError, match=r"M=48 N=128 K=768 do not tile by \(tm, tn, tk\) = \(32, 128, 256\)"):
        w4a8_matmul_tpu(xq, xs, packed, ws, b, 128, tm=32, tn=128, tk=256, interpret=True)
    with pytest.raises(ValueError, match=r"group_size=256 and tk=384 \(K=768\): one must divide the other"):
        w4a8_matmul_tpu(xq, xs, packed, ws[:, :3], b, 256, tm=16, tn=128, tk=384, interpret=True)
    with pytest.raises(ValueError, match=r"tk=192 must be a multiple of the int4 pack block"):
        w4a8_matmul_tpu(xq, xs, packed, ws, b, 128, tm=16, tn=128, tk=192, interpret=True)
    with pytest.raises(ValueError, match=r"scales \(128, 6\) do not fit K=768 in groups of 64"):
        w4a8_matmul_tpu(xq, xs, packed, ws, b, 64, interpret=True)
    with pytest.raises(ValueError, match=r"packed weight \(128, 768\) does not fit activation \(48, 768\)"):
        w4a8_matmul_tpu(xq, xs, jnp.zeros((128, 768), jnp.int8), ws, b, 128, interpret=True)
    with pytest.raises(ValueError, match=r"xs shape \(47,\), want \(48,\)"):
        w4a8_matmul_tpu(xq, xs[:47], packed, ws, b, 128, interpret=True)
    with pytest.raises(TypeError, match="int8 activations"):
        w4a8_matmul_tpu(xq.astype(jnp.int32), xs, packed, ws, b, 128, interpret=True)


@pytest.mark.parametrize("group,tk", [(None, 1152), (64, 1152), (128, 1152), (512, 256)])
def test_cross_lowers_to_mosaic_tpu(group, tk):
    """The real kernel passes the Pallas -> Mosaic TPU lowering (block-shape rules included) at DiT-like sizes."""
    m, k, n = 512, tk if tk == 1152 else 1024, 1152  # the packed block's lanes (tk/2) must be 128·j or K/2
    g = 1 if group is None else k // group
    f = functools.partial(w4a8_matmul_tpu, group_size=group, out_dtype=jnp.bfloat16, tm=128, tn=128, tk=tk)
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((m, k), jnp.int8), ((m,), jnp.float32), ((n, k // 2), jnp.int8),
                                                    ((n, g), jnp.float32), ((n,), jnp.float32)]]
    assert "tpu_custom_call" in jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
