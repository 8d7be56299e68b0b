"""MixDiT mixed GEMM Pallas TPU kernel in Pallas TPU interpret mode on CPU: bit-exact with the reference when the
float32 sums are exact, within the float32 summation bound on real MX9/MX6 operands; the kernel lowers to a Mosaic
TPU custom call (JAX side only: no TPU compiler here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_testutil import dyadic, pow2, relerr

from jdq.kernels.mixdit import ref
from jdq.kernels.mixdit.tpu import mixdit_matmul_tpu

U32 = 2.0**-24
F32, BF16 = jnp.float32, jnp.bfloat16


def _int_operands(m, k_hi, k_lo, n, seed=0):
    """Small-integer codes (never all zero), power-of-two scales, dyadic bias: every partial sum is exact in float32."""
    k1, k2, k3, k4, k5, k6, k7 = jax.random.split(jax.random.key(seed), 7)
    x_hi = jax.random.randint(k1, (m, k_hi), -200, 201).astype(BF16)  # MX9-like magnitudes, exact in bf16
    w_hi = jax.random.randint(k2, (n, k_hi), -30, 31).astype(BF16)
    x_lo = jax.random.randint(k3, (m, k_lo), -8, 9).at[0, 0].set(3).astype(jnp.float8_e4m3fn)
    w_lo = jax.random.randint(k4, (n, k_lo), -8, 9).at[0, 0].set(-7).astype(jnp.float8_e4m3fn)
    return x_hi, x_lo, pow2(k5, (m,)), w_hi, w_lo, pow2(k6, (n,)), dyadic(k7, (n,))


SHAPES = [  # (m, k_hi, k_lo, n, tiles)
    (64, 64, 384, 128, dict(tm=32, tk_lo=128)),  # hi in one step, 3 lo steps, 2 M tiles
    (128, 128, 256, 256, dict(tn=128, tk_hi=64, tk_lo=128)),  # 2 hi steps then 2 lo steps, 2 N tiles
    (32, 0, 512, 128, {}),  # no outlier channels; defaults shrink to the shape
]
CASES = [(SHAPES[0], True, F32, False), (SHAPES[1], False, BF16, True), (SHAPES[2], True, BF16, False),
         (SHAPES[1], True, F32, False)]


def _id(shape, bias, out_dtype, native):
    return "-".join([f"{shape[0]}x{shape[1]}+{shape[2]}x{shape[3]}", "bias" if bias else "nobias",
                     jnp.dtype(out_dtype).name, "native" if native else "upcast"])


@pytest.mark.slow
@pytest.mark.parametrize("shape,bias,out_dtype,fp8_native", CASES, ids=[_id(*c) for c in CASES])
def test_bit_exact_when_sums_are_exact(shape, bias, out_dtype, fp8_native):
    m, k_hi, k_lo, n, tiles = shape
    x_hi, x_lo, s_x, w_hi, w_lo, s_w, b = _int_operands(m, k_hi, k_lo, n, seed=m + k_hi)
    b = b if bias else None
    got = mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, out_dtype, interpret=True, fp8_native=fp8_native,
                            **tiles)
    want = ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.fixture(scope="module")
def mx_operands():
    """The lowered path's operands: x with a few outlier channels, permuted outliers-first, MX9 / MX6 encoded."""
    m, k, n = 64, 384, 128
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (m, k)) * jnp.where(jnp.arange(k) % 29 == 3, 30.0, 1.0)
    w = jax.random.normal(k2, (k, n)) / 16  # (K, N), the model layout
    perm = jnp.argsort(-jnp.abs(x).max(0))  # outliers first
    k_hi = 16
    x_hi, x_lo, s_x = ref.quantize_activation(x, perm, k_hi)
    w_hi, w_lo, s_w, _ = ref.pack_weight(w, perm, k_hi)
    assert x_hi.shape == (m, 64) and x_lo.shape == (m, 384) and bool(jnp.any(x_hi != 0))
    return x_hi, x_lo, s_x, w_hi, w_lo, s_w, jax.random.normal(k3, (n,))


def _exact(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b):
    """float64 value of the MixDiT formula and Σ|terms| (the scale of the float32 summation error)."""
    f = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    s = np.asarray(s_x, np.float64)[:, None] * np.asarray(s_w, np.float64)[None, :]
    val = f(x_hi) @ f(w_hi).T + f(x_lo) @ f(w_lo).T * s + np.asarray(b, np.float64)
    mag = np.abs(f(x_hi)) @ np.abs(f(w_hi)).T + np.abs(f(x_lo)) @ np.abs(f(w_lo)).T * s
    return val, mag


@pytest.mark.parametrize("fp8_native", [False, True], ids=["upcast", "native"])
def test_mx9_mx6_operands_within_float32_summation_bound(mx_operands, fp8_native):
    x_hi, x_lo, s_x, w_hi, w_lo, s_w, b = mx_operands
    k = x_hi.shape[1] + x_lo.shape[1]
    got = np.asarray(mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, F32, tk_lo=128, interpret=True,
                                       fp8_native=fp8_native), np.float64)
    want = np.asarray(ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, F32), np.float64)
    exact, mag = _exact(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b)
    bound = 2 * k * U32 * mag + 4 * U32 * np.abs(exact) + 1e-30
    assert np.all(np.abs(got - exact) <= bound) and np.all(np.abs(want - exact) <= bound)
    assert relerr(got, want) < 1e-6
    got_bf = np.asarray(mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, BF16, tk_lo=128, interpret=True,
                                          fp8_native=fp8_native), np.float32)
    want_bf = np.asarray(ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, BF16), np.float32)
    assert np.all(np.abs(got_bf - want_bf) <= np.abs(want_bf) * 2.0**-7 + 1e-30)  # at most one bf16 ulp


def test_tpu_interpreter_and_jit():
    """The TPU-specific interpreter (simulated VMEM / DMA) and an outer jit give the reference's bits."""
    m, k_hi, k_lo, n, tiles = SHAPES[1]
    ops = _int_operands(m, k_hi, k_lo, n, seed=3)
    want = np.asarray(ref.mixdit_matmul(*ops, F32))
    np.testing.assert_array_equal(np.asarray(mixdit_matmul_tpu(*ops, F32, interpret=pltpu.InterpretParams(), **tiles)),
                                  want)
    f = jax.jit(lambda *a: mixdit_matmul_tpu(*a, F32, interpret=True, **tiles) * 2)
    np.testing.assert_array_equal(np.asarray(f(*ops)), want * 2)


def test_bad_operands_raise():
    x_hi, x_lo, s_x, w_hi, w_lo, s_w, b = _int_operands(64, 64, 384, 128)
    with pytest.raises(ValueError, match=r"M=48 N=128 K_hi=64 K_lo=384 do not tile by \(tm=32, tn=128, tk_hi=64, tk_lo=384\)"):
        mixdit_matmul_tpu(x_hi[:48], x_lo[:48], s_x[:48], w_hi, w_lo, s_w, b, tm=32, interpret=True)
    with pytest.raises(ValueError, match=r"K_hi=64 K_lo=384 do not tile by \(tm=64, tn=128, tk_hi=48, tk_lo=256\)"):
        mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b, tk_hi=48, tk_lo=256, interpret=True)
    with pytest.raises(ValueError, match="disagree"):
        mixdit_matmul_tpu(x_hi, x_lo, s_x, w_hi[:, :32], w_lo, s_w, b, interpret=True)
    with pytest.raises(ValueError, match=r"scales s_x \(32,\)"):
        mixdit_matmul_tpu(x_hi, x_lo, s_x[:32], w_hi, w_lo, s_w, b, interpret=True)
    with pytest.raises(TypeError, match="x_lo and w_lo must be float8_e4m3fn"):
        mixdit_matmul_tpu(x_hi, x_lo.astype(BF16), s_x, w_hi, w_lo, s_w, b, interpret=True)
    with pytest.raises(TypeError, match="x_hi and w_hi must be bfloat16"):
        mixdit_matmul_tpu(x_hi.astype(F32), x_lo, s_x, w_hi, w_lo, s_w, b, interpret=True)


@pytest.mark.parametrize("k_hi", [64, 0])
def test_kernel_lowers_to_mosaic_tpu(k_hi):
    """The non-interpreted kernel lowers (from this CPU) to a Mosaic TPU custom call at a DiT-XL/2 fc1 shape."""
    m, k_lo, n = 512, 1152, 4608
    shapes = [((m, k_hi), BF16), ((m, k_lo), jnp.float8_e4m3fn), ((m,), F32), ((n, k_hi), BF16),
              ((n, k_lo), jnp.float8_e4m3fn), ((n,), F32), ((n,), F32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    f = functools.partial(mixdit_matmul_tpu, out_dtype=BF16, tk_lo=384)
    assert "tpu_custom_call" in jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
