"""Weight-only W8A16 / W4A16 Pallas TPU kernel in interpret mode on CPU against the reference:
bit-exact where all arithmetic is exact, within the float32 dot-product bound otherwise; it
cross-lowers to Mosaic TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import dyadic, pow2

from jdq.kernels.weight_only import ref
from jdq.kernels.weight_only.tpu import weight_only_matmul_tpu

M, K, N = 64, 512, 256


def _operands(key, bits, group, x_dtype, exact, m=M, k=K, n=N):
    """x, codes (packed for bits=4), scales (N, G), bias; ``exact``: every product and sum is exact in float32."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    lim = 127 if bits == 8 else 7
    codes = jax.random.randint(k2, (n, k), -lim, lim + 1).astype(jnp.int8)
    if exact:  # multiples of 1/8 in [-1, 1], power-of-two scales: |Σ| < 2**24 units of 2**-9
        x = (jax.random.randint(k1, (m, k), -8, 9) / 8).astype(x_dtype)
        scale = pow2(k3, (n, k // group), -6, -2)
    else:
        x = jax.random.normal(k1, (m, k), x_dtype)
        scale = jax.random.uniform(k3, (n, k // group), minval=1e-3, maxval=1e-2)
    b = dyadic(k4, (n,)) if exact else jax.random.normal(k4, (n,))
    assert np.any(np.asarray(x) != 0) and np.any(np.asarray(codes) != 0)
    return x, (ref.pack_int4(codes) if bits == 4 else codes), scale, b


def _magnitude(x, codes, scale, b, bits, group):
    """Σ_k |x_k| |Ŵ_nk| + |b_n| in float64: the scale of the dot-product rounding bound."""
    w = np.abs(np.asarray(ref.dequantize(codes, scale, bits, group), np.float64))
    mag = np.abs(np.asarray(x, np.float64)) @ w.T
    return mag if b is None else mag + np.abs(np.asarray(b, np.float64))


# (bits, group (None: per channel), tk): groups inside one K step, one group per step, a group over steps
CASES = [(8, None, 128), (8, 64, 256), (8, 256, 128), (4, None, 256), (4, 64, 128), (4, 128, 128), (4, 256, 128)]


@pytest.mark.parametrize("bits,group,tk", CASES)
def test_interpret_bit_exact_on_exact_arithmetic(bits, group, tk):
    """x on a 1/8 grid, power-of-two scales, dyadic bias: any summation order is exact, so equal bit for bit."""
    gs = K if group is None else group
    x_dtype = jnp.bfloat16 if tk == 128 else jnp.float32
    x, codes, scale, b = _operands(jax.random.key(bits + gs + tk), bits, gs, x_dtype, exact=True)
    b = None if group == 64 else b
    for out in (jnp.float32, jnp.bfloat16):
        got = weight_only_matmul_tpu(x, codes, scale, b, bits, gs, out, tm=32, tn=128, tk=tk, interpret=True)
        want = ref.weight_only_matmul(x, codes, scale, b, bits, gs, out)
        assert got.dtype == out
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("bits,group,tk", [(8, 64, 256), (4, None, 128), (4, 256, 128)])
def test_interpret_random_within_dot_bound(bits, group, tk, x_dtype):
    """Random x and scales: |kernel − ref| ≤ 2·γ_{K+2}·Σ|x||Ŵ| (+ one bf16 ulp after a bf16 cast)."""
    gs = K if group is None else group
    x, codes, scale, b = _operands(jax.random.key(7 * bits + tk), bits, gs, x_dtype, exact=False)
    gamma = (K + 2) * 2.0**-24 / (1 - (K + 2) * 2.0**-24)
    bound = 2 * gamma * _magnitude(x, codes, scale, b, bits, gs)
    got = np.asarray(weight_only_matmul_tpu(x, codes, scale, b, bits, gs, jnp.float32, tm=32, tn=128, tk=tk,
                                            interpret=True))
    want = np.asarray(ref.weight_only_matmul(x, codes, scale, b, bits, gs, jnp.float32))
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(want).max() > 1  # not a vacuous comparison
    got_bf = np.asarray(weight_only_matmul_tpu(x, codes, scale, b, bits, gs, jnp.bfloat16, tm=32, tn=128, tk=tk,
                                               interpret=True), np.float32)
    want_bf = np.asarray(want.astype(jnp.bfloat16), np.float32)
    assert np.all(np.abs(got_bf - want_bf) <= bound + np.abs(want_bf) * 2.0**-7)


def test_default_tiles_shrink_and_out_dtype_follows_x():
    """Defaults (256, 256, 512) shrink to a (16, 256) × (128, 256) problem; out_dtype None gives x's dtype."""
    x, codes, scale, b = _operands(jax.random.key(3), 4, 128, jnp.bfloat16, exact=True, m=16, k=256, n=128)
    got = weight_only_matmul_tpu(x, codes, scale, b, 4, 128, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(ref.weight_only_matmul(x, codes, scale, b, 4, 128), np.float32))


def test_jit_and_vmap_of_a_caller():
    """Inside a user's jit (and vmap over a batch of activations) the kernel gives the same values."""
    x, codes, scale, b = _operands(jax.random.key(4), 8, 128, jnp.bfloat16, exact=True, m=32, k=256, n=128)
    call = functools.partial(weight_only_matmul_tpu, bits=8, group_size=128, out_dtype=jnp.float32, tm=16, tn=128,
                             tk=128, interpret=True)
    want = np.asarray(ref.weight_only_matmul(x, codes, scale, b, 8, 128, jnp.float32))
    got = jax.jit(lambda x, c, s, b: call(x, c, s, b) * 2)(x, codes, scale, b)
    np.testing.assert_array_equal(np.asarray(got), want * 2)
    xb = jnp.stack([x, -x])
    got_b = jax.jit(jax.vmap(call, in_axes=(0, None, None, None)))(xb, codes, scale, None)
    np.testing.assert_array_equal(np.asarray(got_b[1]), -np.asarray(ref.weight_only_matmul(x, codes, scale, None, 8,
                                                                                            128, jnp.float32)))


def test_bad_shapes_raise():
    x, codes, scale, b = _operands(jax.random.key(5), 4, 128, jnp.bfloat16, exact=True, m=48, k=384, n=128)
    with pytest.raises(ValueError, match=r"M=48 N=128 K=384 do not tile by \(tm, tn, tk\) = \(32, 128, 128\)"):
        weight_only_matmul_tpu(x, codes, scale, b, 4, 128, tm=32, tn=128, tk=128, interpret=True)
    with pytest.raises(ValueError, match=r"tk=64 must be a multiple of the int4 pack block 128 \(K=384\)"):
        weight_only_matmul_tpu(x, codes, scale, b, 4, 128, tm=16, tn=128, tk=64, interpret=True)
    x8, codes8, scale8, _ = _operands(jax.random.key(5), 8, 128, jnp.bfloat16, exact=True, m=48, k=384, n=128)
    with pytest.raises(ValueError, match=r"group_size=128 and tk=192 \(K=384\): one must divide the other"):
        weight_only_matmul_tpu(x8, codes8, scale8, b, 8, 128, tm=16, tn=128, tk=192, interpret=True)
    with pytest.raises(ValueError, match=r"scale shape \(128, 2\) disagree"):
        weight_only_matmul_tpu(x, codes, scale[:, :2], b, 4, 128, interpret=True)
    with pytest.raises(ValueError, match=r"do not fit x \(48, 384\) with bits=8"):
        weight_only_matmul_tpu(x, codes, scale, b, 8, 128, interpret=True)


@pytest.mark.parametrize("bits,group,x_dtype", [(8, 64, jnp.bfloat16), (4, None, jnp.bfloat16), (4, 128, jnp.float32),
                                                (8, 512, jnp.bfloat16)])
def test_cross_lowers_to_mosaic_tpu(bits, group, x_dtype):
    """The real kernel passes the Pallas -> Mosaic TPU lowering (block-shape rules included) at DiT-like sizes."""
    m, k, n = 512, 1024 if group == 512 else 1152, 1152
    gs = k if group is None else group
    tk = 256 if group == 512 else (384 if bits == 8 else k)  # int4: the packed block's lanes (tk/2) must be 128·j or K/2
    f = functools.partial(weight_only_matmul_tpu, bits=bits, group_size=gs, out_dtype=jnp.bfloat16, tm=128, tn=128,
                          tk=tk)
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((m, k), x_dtype), ((n, k if bits == 8 else k // 2), jnp.int8),
                                                    ((n, k // gs), jnp.float32), ((n,), jnp.float32)]]
    assert "tpu_custom_call" in jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
