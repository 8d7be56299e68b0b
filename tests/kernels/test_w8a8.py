"""W8A8: reference semantics vs jdq.formats and the fake-quant path; GPU kernels in Pallas GPU
interpret mode (bit-exact integer accumulation); the real GPU variants lower to Mosaic GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import assert_within_reordering_bound

from jdq.kernels.w8a8 import ref
from jdq.kernels.w8a8.gpu import FUSED_ACTIVATIONS, Config, w8a8_matmul_gpu
from jdq.models.layers import ACTIVATIONS


def _operands(key, m, k, n, pow2=True):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    xq = jax.random.randint(k1, (m, k), -127, 128, jnp.int8)
    wq = jax.random.randint(k2, (n, k), -127, 128, jnp.int8)
    if pow2:  # power-of-two scales and a dyadic bias: the float epilogue is exact, so bit-exact
        xs = 2.0 ** jax.random.randint(k3, (m,), -12, -4).astype(jnp.float32)
        ws = 2.0 ** jax.random.randint(k4, (n,), -12, -4).astype(jnp.float32)
        b = jnp.round(jax.random.normal(k5, (n,)) * 64) / 64
    else:
        xs = jax.random.uniform(k3, (m,), jnp.float32, 1e-3, 2e-2)
        ws = jax.random.uniform(k4, (n,), jnp.float32, 1e-3, 2e-2)
        b = jax.random.normal(k5, (n,))
    return xq, xs, wq, ws, b


def test_quantize_per_token_matches_formats():
    from jdq import formats

    x = jax.random.normal(jax.random.key(0), (64, 96)) * jnp.linspace(0.1, 30, 96)
    x = x.at[3].set(0.0)  # an all-zero row: scale clamps, codes are zero
    q, s = ref.quantize_per_token(x)
    qt = formats.quantize(x, "int8", axis=-1, granularity="row")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(qt.codes))
    deq = q.astype(jnp.float32) * s[:, None]
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(formats.cast(x, "int8", axis=-1, granularity="row")))
    assert int(jnp.abs(q).max()) == 127 and not bool(jnp.any(q[3]))


def test_reference_equals_fake_quant_path():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (48, 256)) * 3
    w = jax.random.normal(k2, (256, 128)) / 16  # (K, N), the model layout
    b = jax.random.normal(k3, (128,))
    wq, ws = ref.quantize_per_channel(w.T, axis=-1)
    got = ref.w8a8_linear(x, wq, ws, b)
    from jdq import formats

    xh, wh = formats.cast(x, "int8", axis=-1, granularity="row"), formats.cast(w, "int8", axis=-2, granularity="row")
    fake = xh @ wh + b
    # the kernel's integer dot is exact, then two scale multiplies and the bias add; the fake path sums the
    # K float32 products and the bias: both within the float32 summation bound of K + 3 terms
    abs_sum = np.abs(np.asarray(xh, np.float64)) @ np.abs(np.asarray(wh, np.float64)) + np.abs(np.asarray(b, np.float64))
    assert_within_reordering_bound(got, fake, abs_sum, x.shape[1] + 3)
    assert_within_reordering_bound(ref.fake_quant_linear(x, wq, ws, b), fake, abs_sum, x.shape[1] + 3)


CONFIGS = [
    Config("pipe", 64, 64, 128, 2),
    Config("pipe", 128, 128, 128, 3, wgmma_wait=1),
    Config("ws", 64, 64, 128, 2, wg_dim="m", num_sms=3),
    Config("ws", 64, 64, 128, 3, wg_dim="n", num_sms=2, grid_minor="m"),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-{c.tile_m}x{c.tile_n}-{c.wg_dim}")
def test_gpu_kernel_interpret_bit_exact(cfg):
    m, k, n = 128, 384, 256
    xq, xs, wq, ws, b = _operands(jax.random.key(2), m, k, n)
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=True)
    want = ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[-1]], ids=["pipe", "ws"])
@pytest.mark.parametrize("act", FUSED_ACTIVATIONS)
def test_gpu_kernel_interpret_fused_activation(cfg, act):
    """``activation=`` in the epilogue is the activation of the float32 reference output (before the cast)."""
    xq, xs, wq, ws, b = _operands(jax.random.key(5), 128, 384, 256)
    got = np.asarray(w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=True, activation=act))
    plain = ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)
    # the same activation formula on the same float32 input, once fused in the epilogue: they differ only
    # where XLA evaluates it differently (vectorized exp/tanh, reassociated constants), a few ulps each
    want = np.asarray(ACTIVATIONS[act](plain), np.float64)
    assert np.all(np.abs(got - want) <= 16 * 2.0**-24 * (np.abs(want) + np.abs(np.asarray(plain, np.float64))))
    assert np.mean(np.abs(got - np.asarray(plain)) > 1e-3) > 0.3  # the activation did change the output
    with pytest.raises(ValueError, match="'gelu' cannot be fused"):
        w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=True, activation="gelu")


def test_gpu_kernel_interpret_random_scales_bf16():
    xq, xs, wq, ws, b = _operands(jax.random.key(3), 128, 256, 128, pow2=False)
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.bfloat16, Config("pipe", 64, 64, 128, 2), interpret=True)
    want = ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)
    got = np.asarray(got, np.float32)
    want_bf = np.asarray(want.astype(jnp.bfloat16), np.float32)
    # FMA contraction may move a value across a bf16 rounding boundary: at most one bf16 ulp
    ulp = np.abs(want_bf) * 2.0**-7 + 1e-30
    assert np.all(np.abs(got - want_bf) <= ulp)
    assert np.mean(got != want_bf) < 1e-3


@pytest.mark.parametrize("cfg", [Config("pipe", 128, 128, 128, 3), Config("ws", 128, 64, 128, 4, wg_dim="n")],
                         ids=["pipe", "ws"])
def test_gpu_kernel_lowers_to_mosaic_gpu(cfg):
    """The real (non-interpreted) kernel, with transposed K-major B and swizzled tiles, lowers."""
    m, k, n = 512, 1152, 1152
    shapes = [((m, k), jnp.int8), ((m,), jnp.float32), ((n, k), jnp.int8), ((n,), jnp.float32), ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    f = jax.jit(functools.partial(w8a8_matmul_gpu, out_dtype=jnp.bfloat16, config=cfg))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("act", FUSED_ACTIVATIONS)
def test_fused_activation_lowers_to_mosaic_gpu(act):
    """The epilogue's activation ops (tanh, logistic) lower in the warp-specialised kernel."""
    m, k, n = 256, 256, 256
    shapes = [((m, k), jnp.int8), ((m,), jnp.float32), ((n, k), jnp.int8), ((n,), jnp.float32), ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cfg = Config("ws", 128, 64, 128, 4, wg_dim="n")
    f = jax.jit(functools.partial(w8a8_matmul_gpu, out_dtype=jnp.bfloat16, config=cfg, activation=act))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_bad_shapes_raise():
    xq, xs, wq, ws, b = _operands(jax.random.key(4), 128, 256, 128)
    with pytest.raises(ValueError, match="disagree on K"):
        w8a8_matmul_gpu(xq, xs, wq[:, :128], ws, b, jnp.float32, Config("pipe", 64, 64, 128, 2), interpret=True)
    with pytest.raises(ValueError, match="not a multiple"):
        w8a8_matmul_gpu(xq[:100], xs[:100], wq, ws, b, jnp.float32, Config("pipe", 64, 64, 128, 2), interpret=True)


def test_tpu_kernel_interpret_bit_exact():
    from jdq.kernels.w8a8.tpu import w8a8_matmul_tpu

    xq, xs, wq, ws, b = _operands(jax.random.key(5), 256, 512, 256)
    got = w8a8_matmul_tpu(xq, xs, wq, ws, b, jnp.float32, tm=128, tn=128, tk=256, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)))


def test_fp8_reference_equals_fake_quant_path():
    from jdq import formats

    k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k1, (48, 256)) * 3
    w = jax.random.normal(k2, (256, 128)) / 16  # (K, N)
    b = jax.random.normal(k3, (128,))
    wq, ws = ref.quantize_per_channel_fp8(w.T, axis=-1)
    assert wq.dtype == jnp.float8_e4m3fn
    got = ref.w8a8_linear(x, wq, ws, b)
    xh, wh = formats.cast(x, "fp8_e4m3", axis=-1), formats.cast(w, "fp8_e4m3", axis=-2)
    fake = xh @ wh + b
    # E4M3 products are exact in float32 but their K-sum is not: both sides within the summation bound
    abs_sum = np.abs(np.asarray(xh, np.float64)) @ np.abs(np.asarray(wh, np.float64)) + np.abs(np.asarray(b, np.float64))
    assert_within_reordering_bound(got, fake, abs_sum, x.shape[1] + 3)


@pytest.mark.parametrize("cfg", [Config("pipe", 64, 64, 128, 2), Config("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2)],
                         ids=["pipe", "ws"])
def test_fp8_gpu_kernel_interpret_bit_exact(cfg):
    # small-integer E4M3 codes: every partial sum is an exact float32 integer, so any order is exact
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(7), 5)
    m, k, n = 128, 256, 128
    xq = jax.random.randint(k1, (m, k), -8, 9).astype(jnp.float8_e4m3fn)
    wq = jax.random.randint(k2, (n, k), -8, 9).astype(jnp.float8_e4m3fn)
    xs = 2.0 ** jax.random.randint(k3, (m,), -12, -4).astype(jnp.float32)
    ws = 2.0 ** jax.random.randint(k4, (n,), -12, -4).astype(jnp.float32)
    b = jnp.round(jax.random.normal(k5, (n,)) * 64) / 64
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32)))


def test_fp8_gpu_kernel_lowers_to_mosaic_gpu():
    m, k, n = 4096, 1152, 4608
    shapes = [((m, k), jnp.float8_e4m3fn), ((m,), jnp.float32), ((n, k), jnp.float8_e4m3fn), ((n,), jnp.float32), ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cfg = Config("ws", 128, 64, 128, 4, wg_dim="n")
    f = jax.jit(functools.partial(w8a8_matmul_gpu, out_dtype=jnp.bfloat16, config=cfg))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(TypeError, match="both alike"):
        w8a8_matmul_gpu(jnp.zeros((128, 128), jnp.int8), jnp.ones(128), jnp.zeros((128, 128), jnp.float8_e4m3fn),
                        jnp.ones(128), None, jnp.float32, Config("pipe", 64, 64, 128, 2), interpret=True)


WS_SMALL = Config("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2)


@pytest.mark.slow
def test_gpu_kernel_interpret_split_outputs():
    xq, xs, wq, ws, b = _operands(jax.random.key(7), 128, 128, 384)
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, WS_SMALL, interpret=True, split=3)
    want = ref.split_columns(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.float32), 3)
    assert len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_gpu_kernel_interpret_gated_residual():
    xq, xs, wq, ws, b = _operands(jax.random.key(8), 128, 128, 128)
    k1, k2 = jax.random.split(jax.random.key(9))
    res = jax.random.normal(k1, (128, 128)).astype(jnp.bfloat16)
    gate = jax.random.normal(k2, (2, 128)).astype(jnp.bfloat16)  # two samples of 64 tokens
    got = w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.bfloat16, WS_SMALL, interpret=True, residual=res, gate=gate)
    want = ref.gated_residual(ref.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16), res, gate)
    # exact: y is rounded to bf16 as in the reference, then res + gate·y in float32 rounded once
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_gated_residual_reference_is_the_model_residual():
    k1, k2, k3 = jax.random.split(jax.random.key(10), 3)
    y, x = jax.random.normal(k1, (2, 8, 16)), jax.random.normal(k2, (2, 8, 16))
    gate = jax.random.normal(k3, (2, 16))
    want = x + gate[:, None, :] * y  # jdq.models.layers.GatedResidual, float32
    got = ref.gated_residual(y.reshape(16, 16), x.reshape(16, 16), gate)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.reshape(16, 16)))


def test_fused_extras_lower_to_mosaic_gpu():
    from kernel_testutil import lowers_to_mosaic_gpu

    cfg = Config(kind="ws", tile_m=128, tile_n=64, tile_k=128, stages=4, wg_dim="n")
    qkv = functools.partial(w8a8_matmul_gpu, out_dtype=jnp.bfloat16, config=cfg, split=3)
    assert lowers_to_mosaic_gpu(qkv, ((16384, 1152), jnp.int8), ((16384,), jnp.float32), ((3456, 1152), jnp.int8),
                                ((3456,), jnp.float32), ((3456,), jnp.float32))
    fc2 = lambda xq, xs, wq, ws, b, r, g: w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.bfloat16, cfg, residual=r, gate=g)  # noqa: E731
    assert lowers_to_mosaic_gpu(fc2, ((16384, 4608), jnp.int8), ((16384,), jnp.float32), ((1152, 4608), jnp.int8),
                                ((1152,), jnp.float32), ((1152,), jnp.float32), ((16384, 1152), jnp.bfloat16),
                                ((64, 1152), jnp.bfloat16))


def test_fused_extras_bad_shapes_raise():
    xq, xs, wq, ws, b = _operands(jax.random.key(11), 128, 128, 128)
    with pytest.raises(ValueError, match="multiple of the CTA tile"):
        w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, WS_SMALL, interpret=True, split=2)
    with pytest.raises(ValueError, match="need Config"):
        w8a8_matmul_gpu(xq, xs, wq, ws, b, jnp.float32, Config("pipe", 64, 64, 128, 2), interpret=True, split=1,
                        residual=jnp.zeros((128, 128)), gate=jnp.zeros((2, 128)))
