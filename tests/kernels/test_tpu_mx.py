"""MX block-scaled GEMM Pallas TPU kernel in Pallas TPU interpret mode on CPU: MXINT8 bit-exact with the reference;
MXFP8 bit-exact when each block's float32 partial sum is exact, within the float32 summation bound otherwise; the
kernel lowers to a Mosaic TPU custom call (JAX side only: no TPU compiler here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_testutil import dyadic, relerr

from jdq.kernels.mx import ref
from jdq.kernels.mx.tpu import mx_matmul_tpu

U32 = 2.0**-24


def _operands(fmt, m, k, n, seed=0, block_int=False):
    """MX-quantized x (M, K), w (N, K) with blocks of very different magnitude along K, and a dyadic bias.

    ``block_int``: x, w are small integers times a power of two per block, so every block product of the
    codes is a sum of integers far below 2^24 (exact in float32 in any order).
    """
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    xmag = (2.0 ** jax.random.randint(k3, (m, k // 32), -8, 8)).repeat(32, 1)
    wmag = (2.0 ** jax.random.randint(k4, (n, k // 32), -4, 4)).repeat(32, 1)
    if block_int:
        x = jax.random.randint(k1, (m, k), -8, 9).astype(jnp.float32).at[:, ::32].set(7.0) * xmag
        w = jax.random.randint(k2, (n, k), -8, 9).astype(jnp.float32).at[:, ::32].set(-5.0) * wmag
    else:
        x = jax.random.normal(k1, (m, k)) * xmag
        w = jax.random.normal(k2, (n, k)) * wmag
    x = x.at[0, 32:64].set(0.0)  # an all-zero block: scale byte 0 -> scale 0
    xq, xs = ref.quantize_operand(x, fmt)
    wq, ws = ref.quantize_operand(w, fmt)
    assert float(xs[1, 0]) == 0.0 and bool(jnp.any(xq.astype(jnp.float32) != 0))
    return xq, xs, wq, ws, dyadic(k5, (n,))


SHAPES = [  # (m, k, n, tiles)
    (64, 256, 128, dict(tm=32, tk=128)),  # 2 M tiles, 2 K steps of 4 blocks
    (128, 384, 256, dict(tn=128, tk=64)),  # 6 K steps of 2 blocks
    (32, 512, 128, {}),  # defaults shrink to the shape: one tile, 16 blocks
]
F32, BF16 = jnp.float32, jnp.bfloat16
INT_CASES = [(SHAPES[0], True, F32), (SHAPES[1], False, BF16), (SHAPES[2], True, BF16)]
FP8_CASES = [(SHAPES[0], True, BF16, False), (SHAPES[1], False, F32, True), (SHAPES[2], False, F32, False),
             (SHAPES[2], True, BF16, True)]


def _id(shape, bias, out_dtype, *native):
    tail = ["native" if native[0] else "upcast"] if native else []
    return "-".join([f"{shape[0]}x{shape[1]}x{shape[2]}", "bias" if bias else "nobias", jnp.dtype(out_dtype).name] + tail)


@pytest.mark.slow
@pytest.mark.parametrize("shape,bias,out_dtype", INT_CASES, ids=[_id(*c) for c in INT_CASES])
def test_mxint8_bit_exact(shape, bias, out_dtype):
    m, k, n, tiles = shape
    xq, xs, wq, ws, b = _operands("mxint8", m, k, n, seed=m + k)
    b = b if bias else None
    got = mx_matmul_tpu(xq, xs, wq, ws, b, out_dtype, interpret=True, **tiles)
    assert got.dtype == out_dtype and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(ref.mx_matmul(xq, xs, wq, ws, b, out_dtype), np.float32))


@pytest.mark.parametrize("shape,bias,out_dtype,fp8_native", FP8_CASES, ids=[_id(*c) for c in FP8_CASES])
def test_mxfp8_bit_exact_when_block_sums_are_exact(shape, bias, out_dtype, fp8_native):
    m, k, n, tiles = shape
    xq, xs, wq, ws, b = _operands("mxfp8_e4m3", m, k, n, seed=m + k, block_int=True)
    b = b if bias else None
    got = mx_matmul_tpu(xq, xs, wq, ws, b, out_dtype, interpret=True, fp8_native=fp8_native, **tiles)
    assert got.dtype == out_dtype and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(ref.mx_matmul(xq, xs, wq, ws, b, out_dtype), np.float32))


def _exact(xq, xs, wq, ws, b):
    """float64 value of the MX formula and Σ_g a_g·b_g·Σ|products of block g| (the scale of the rounding error)."""
    g = xs.shape[0]
    x = np.asarray(xq.astype(jnp.float32), np.float64).reshape(xq.shape[0], g, 32)
    w = np.asarray(wq.astype(jnp.float32), np.float64).reshape(wq.shape[0], g, 32)
    s = np.asarray(xs, np.float64)[:, :, None] * np.asarray(ws, np.float64)[:, None, :]  # (G, M, N)
    val = (np.einsum("mgk,ngk->gmn", x, w) * s).sum(0) + np.asarray(b, np.float64)
    return val, (np.einsum("mgk,ngk->gmn", np.abs(x), np.abs(w)) * s).sum(0)


@pytest.mark.parametrize("fp8_native", [False, True], ids=["bf16-upcast", "native"])
def test_mxfp8_within_float32_summation_bound(fp8_native):
    m, k, n, tiles = SHAPES[0]
    xq, xs, wq, ws, b = _operands("mxfp8_e4m3", m, k, n, seed=5)
    got = np.asarray(mx_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, interpret=True, fp8_native=fp8_native, **tiles),
                     np.float64)
    want = np.asarray(ref.mx_matmul(xq, xs, wq, ws, b, jnp.float32), np.float64)
    exact, mag = _exact(xq, xs, wq, ws, b)
    # 32-term block sums in any float32 order, then G + 1 rounded additions: within (32 + G + 1)·u·Σ|terms|
    bound = 2 * (32 + k // 32 + 1) * U32 * mag + 2 * U32 * np.abs(exact) + 1e-30
    assert np.all(np.abs(got - exact) <= bound) and np.all(np.abs(want - exact) <= bound)
    assert relerr(got, want) < 1e-6


def test_tpu_interpreter_and_jit():
    """The TPU-specific interpreter (simulated VMEM / DMA) and an outer jit (quantizing inside) agree with the reference."""
    m, k, n, tiles = SHAPES[0]
    xq, xs, wq, ws, b = _operands("mxint8", m, k, n, seed=9)
    want = np.asarray(ref.mx_matmul(xq, xs, wq, ws, b, jnp.float32))
    got = mx_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, interpret=pltpu.InterpretParams(), **tiles)
    np.testing.assert_array_equal(np.asarray(got), want)

    @jax.jit
    def linear(x, wq, ws, b):
        xq, xs = ref.quantize_operand(x, "mxint8")
        return mx_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, interpret=True, **tiles)

    x = jax.random.normal(jax.random.key(10), (m, k))
    np.testing.assert_array_equal(np.asarray(linear(x, wq, ws, b)),
                                  np.asarray(ref.mx_linear(x, wq, ws, "mxint8", b, jnp.float32)))


def test_bad_shapes_raise():
    xq, xs, wq, ws, b = _operands("mxint8", 64, 256, 128)
    with pytest.raises(ValueError, match=r"M=48 N=128 K=256 do not tile by \(32, 128, 256\)"):
        mx_matmul_tpu(xq[:48], xs[:, :48], wq, ws, b, tm=32, interpret=True)
    with pytest.raises(ValueError, match=r"M=64 N=128 K=192 do not tile by \(64, 128, 48\) \(tk must also be a multiple of 32"):
        mx_matmul_tpu(xq[:, :192], xs[:6], wq[:, :192], ws[:6], b, tk=48, interpret=True)
    with pytest.raises(ValueError, match=r"xs \(7, 64\), ws \(8, 128\) disagree"):
        mx_matmul_tpu(xq, xs[:7], wq, ws, b, interpret=True)
    with pytest.raises(TypeError, match="must both be int8 or both float8_e4m3fn"):
        mx_matmul_tpu(xq, xs, wq.astype(jnp.float8_e4m3fn), ws, b, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8], ids=["mxfp8", "mxint8"])
def test_kernel_lowers_to_mosaic_tpu(dtype):
    """The non-interpreted kernel lowers (from this CPU) to a Mosaic TPU custom call at a DiT-XL/2 qkv shape."""
    m, k, n = 512, 1152, 3456
    shapes = [((m, k), dtype), ((k // 32, m), jnp.float32), ((n, k), dtype), ((k // 32, n), jnp.float32),
              ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    f = functools.partial(mx_matmul_tpu, out_dtype=jnp.bfloat16, tn=384, tk=384)
    assert "tpu_custom_call" in jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
