"""W8A8 Pallas TPU kernel with FP8 E4M3 operands, in Pallas TPU interpret mode on CPU: bit-exact with the
reference when the float32 accumulation is exact, within the float32 summation bound otherwise; the kernel
lowers to a Mosaic TPU custom call (JAX side only: no TPU compiler here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_testutil import dyadic, pow2, relerr

from jdq.kernels.w8a8 import ref
from jdq.kernels.w8a8.tpu import w8a8_matmul_tpu

U32 = 2.0**-24


def _small_int_operands(key, m, k, n, dtype=jnp.float8_e4m3fn):
    """Codes in [-8, 8] (never all zero), power-of-two scales, dyadic bias: every partial sum and the epilogue are exact."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    xq = jax.random.randint(k1, (m, k), -8, 9).at[0, 0].set(5).astype(dtype)
    wq = jax.random.randint(k2, (n, k), -8, 9).at[0, 0].set(-3).astype(dtype)
    return xq, pow2(k3, (m,)), wq, pow2(k4, (n,)), dyadic(k5, (n,))


def _quantized_operands(key, m, k, n):
    """Random activations / weights quantized per token / per channel to E4M3 (the lowered path's operands)."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (m, k)) * jnp.linspace(0.2, 20.0, k)  # channels of different magnitude
    w = jax.random.normal(k2, (n, k)) / 16
    xq, xs = ref.quantize_per_token_fp8(x)
    wq, ws = ref.quantize_per_channel_fp8(w, axis=-1)
    return xq, xs, wq, ws, jax.random.normal(k3, (n,))


SHAPES = [  # (m, k, n, tiles): several K steps, defaults shrinking to the shape, one M/N tile
    (256, 512, 256, dict(tm=128, tn=128, tk=128)),
    (64, 384, 192, {}),
    (128, 1024, 128, dict(tk=256)),
]


CASES = [  # (shape, bias, fp8_native): every shape, bias / no bias, the bf16 upcast and the native E4M3 dot
    (SHAPES[0], True, False), (SHAPES[1], False, False), (SHAPES[2], True, True), (SHAPES[0], False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("shape,bias,fp8_native", CASES,
                         ids=[f"{s[0]}x{s[1]}x{s[2]}-{'bias' if b else 'nobias'}-{'native' if nat else 'upcast'}"
                              for s, b, nat in CASES])
def test_fp8_bit_exact_when_accumulation_is_exact(shape, bias, fp8_native):
    m, k, n, tiles = shape
    xq, xs, wq, ws, b = _small_int_operands(jax.random.key(m + k + n), m, k, n)
    b = b if bias else None
    for out_dtype in (jnp.float32, jnp.bfloat16):
        got = w8a8_matmul_tpu(xq, xs, wq, ws, b, out_dtype, interpret=True, fp8_native=fp8_native, **tiles)
        want = ref.w8a8_matmul(xq, xs, wq, ws, b, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _exact(xq, xs, wq, ws, b):
    """float64 value of the W8A8 formula, and Σ|x_q·w_q|·s_x·s_w (the scale of the summation error)."""
    x64, w64 = np.asarray(xq, np.float64), np.asarray(wq, np.float64)
    s = np.asarray(xs, np.float64)[:, None] * np.asarray(ws, np.float64)[None, :]
    return x64 @ w64.T * s + np.asarray(b, np.float64), np.abs(x64) @ np.abs(w64).T * s


@pytest.mark.parametrize("m,k,n,tiles", SHAPES[:2], ids=["256x512x256", "64x384x192"])
def test_fp8_quantized_operands_within_float32_summation_bound(m, k, n, tiles):
    xq, xs, wq, ws, b = _quantized_operands(jax.random.key(7), m, k, n)
    assert xq.dtype == wq.dtype == jnp.float8_e4m3fn and bool(jnp.any(xq.astype(jnp.float32) != 0))
    got = np.asarray(w8a8_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, interpret=True, **tiles), np.float64)
    want = np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32), np.float64)
    exact, mag = _exact(xq, xs, wq, ws, b)
    # any float32 summation order of K exact products is within K·u·Σ|p| (two more roundings in the epilogue)
    bound = 2 * k * U32 * mag + 4 * U32 * np.abs(exact) + 1e-30
    assert np.all(np.abs(got - exact) <= bound) and np.all(np.abs(want - exact) <= bound)
    assert relerr(got, want) < 1e-6
    # bf16 output: the float32 results differ by summation rounding only, so at most one bf16 ulp apart
    got_bf = np.asarray(w8a8_matmul_tpu(xq, xs, wq, ws, b, jnp.bfloat16, interpret=True, **tiles), np.float32)
    want_bf = np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16), np.float32)
    assert np.all(np.abs(got_bf - want_bf) <= np.abs(want_bf) * 2.0**-7 + 1e-30)
    assert np.mean(got_bf != want_bf) < 0.01


def test_int8_and_fp8_share_the_kernel_no_bias_bf16():
    """The int8 path still works through the same entry point (bit-exact int32 accumulation)."""
    xq, xs, wq, ws, _ = _small_int_operands(jax.random.key(11), 128, 256, 128, jnp.int8)
    got = w8a8_matmul_tpu(xq, xs, wq, ws, None, jnp.bfloat16, tm=64, tk=128, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, None, jnp.bfloat16), np.float32))


def test_fp8_tpu_interpreter_and_jit():
    """The TPU-specific interpreter (simulated VMEM / DMA) and an outer jit give the same bits."""
    xq, xs, wq, ws, b = _small_int_operands(jax.random.key(12), 128, 256, 128)
    want = np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32))
    got = w8a8_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, tm=64, tk=128, interpret=pltpu.InterpretParams())
    np.testing.assert_array_equal(np.asarray(got), want)

    @jax.jit
    def linear(x, wq, ws, b):  # quantize inside the jit, like the lowered path
        xq, xs = ref.quantize_per_token_fp8(x)
        return w8a8_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, tk=128, interpret=True)

    x = xq.astype(jnp.float32) * xs[:, None]
    want_lin = ref.w8a8_linear(x, wq, ws, b, jnp.float32)
    assert relerr(linear(x, wq, ws, b), want_lin) < 1e-6


def test_shapes_that_do_not_tile_raise():
    xq, xs, wq, ws, b = _small_int_operands(jax.random.key(13), 128, 256, 128)
    with pytest.raises(ValueError, match=r"M=100 N=128 K=256 do not tile by \(64, 128, 256\)"):
        w8a8_matmul_tpu(xq[:100], xs[:100], wq, ws, b, tm=64, interpret=True)
    with pytest.raises(ValueError, match=r"M=128 N=128 K=256 do not tile by \(128, 128, 96\)"):
        w8a8_matmul_tpu(xq, xs, wq, ws, b, tk=96, interpret=True)
    with pytest.raises(ValueError, match="disagree on K"):
        w8a8_matmul_tpu(xq, xs, wq[:, :128], ws, b, interpret=True)
    with pytest.raises(TypeError, match="must both be int8 or both float8_e4m3fn"):
        w8a8_matmul_tpu(xq, xs, wq.astype(jnp.float32).astype(jnp.int8), ws, b, interpret=True)


@pytest.mark.parametrize("fp8_native", [False, True], ids=["bf16-upcast", "native"])
def test_fp8_kernel_lowers_to_mosaic_tpu(fp8_native):
    """The non-interpreted kernel lowers (from this CPU) to a Mosaic TPU custom call at a DiT-XL/2 fc1 shape."""
    m, k, n = 512, 1152, 4608
    shapes = [((m, k), jnp.float8_e4m3fn), ((m,), jnp.float32), ((n, k), jnp.float8_e4m3fn), ((n,), jnp.float32),
              ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    f = functools.partial(w8a8_matmul_tpu, out_dtype=jnp.bfloat16, tk=384, fp8_native=fp8_native)
    assert "tpu_custom_call" in jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
