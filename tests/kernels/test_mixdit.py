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


# ---------------------------------------------------------------------------------------------- one-pass split kernel

from jdq.kernels.mixdit import split_gpu  # noqa: E402


def _adversarial(m, k, dtype, seed=0, nonfinite=True):
    """Rows with blocks many binades apart, zeros, subnormals, values at the rounding edges (and NaN / ±Inf)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32) * np.exp2(rng.integers(-30, 30, size=(m, 1)))
    a *= np.exp2(rng.integers(-8, 8, size=(1, k)))  # blocks of a row several binades apart
    a[0] = 0.0
    a[1, : k // 2] = 1e-39  # subnormal: flushed
    a[2] = rng.choice([0.9995, -0.9999, 1.0, 127.5, 15.5, -7.75, 2.0**-126], k)
    a[3, ::7] *= 2.0**20  # a few channels far above the rest of the row (lo part > 12 binades: E4M3 rounding)
    if nonfinite:
        a[4, 5], a[5, k - 3], a[6, k // 3] = np.nan, np.inf, -np.inf
    return jnp.asarray(a).astype(dtype)


def _bits(a):
    a = jnp.asarray(a)
    return np.asarray(jax.lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]))


def _assert_split_equal(got, want, x=None):
    """Bit-identical operands; rows of ``x`` with NaN / ±Inf only NaN at the same places (the reference's row
    exponent there comes from XLA's max reduction over NaN, which is implementation-defined)."""
    finite = np.ones(got[2].shape[0], bool) if x is None else np.isfinite(np.asarray(x, np.float32)).all(axis=1)
    for g, w, name in zip(got, want, ("x_hi", "x_lo", "s_x")):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        gb, wb = _bits(g)[finite], _bits(w)[finite]
        assert (gb != wb).sum() == 0, f"{name}: {(gb != wb).sum()} of {gb.size} bit patterns differ"
        if name != "s_x":
            gn, wn = np.isnan(np.asarray(g, np.float32)), np.isnan(np.asarray(w, np.float32))
            np.testing.assert_array_equal(gn, wn)


def test_e4m3_bits_equal_xla_conversion():
    """The kernel's integer E4M3 encoding == XLA's float32 -> E4M3 conversion on every value the split makes."""
    q = np.arange(-15, 16, dtype=np.float32)
    w = (q[:, None] * np.exp2(np.arange(-24, 5, dtype=np.float32))[None, :]).ravel()
    w = jnp.asarray(np.concatenate([w, [np.nan, -0.0, 0.0, 240.0, 2.0**-6, 2.0**-10, 3 * 2.0**-11]]).astype(np.float32))
    want = _bits(w.astype(jnp.float8_e4m3fn))
    got = np.asarray(split_gpu.e4m3_bits(w)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(split_gpu.e4m3_cvt_bits(w)).astype(np.uint8), want)


@pytest.mark.parametrize("m", [4, 7])
def test_smx_cast_blocks_equal_the_format_cast(m):
    """The kernel's register formulation (16 arrays, pairs i, i^1) == jdq.formats' MX9 / MX6 cast."""
    from jdq import formats

    x = _adversarial(64, 16 * 8, jnp.float32, seed=m).astype(jnp.float32)
    blocks = x.reshape(-1, 16)
    got = jnp.stack(split_gpu.smx_cast_blocks([blocks[:, i] for i in range(16)], m), axis=1).reshape(x.shape)
    want = formats.cast(x, {4: "mx6", 7: "mx9"}[m], axis=-1)
    np.testing.assert_array_equal(_bits(got), _bits(want))


SPLIT_CASES = {  # (M, K, k_hi, dtype, perm, config)
    "bf16_small": (8, 256, 16, jnp.bfloat16, "random", split_gpu.SplitConfig(max_rows=2)),
    "bf16_k384": (32, 384, 32, jnp.bfloat16, "random", split_gpu.SplitConfig(max_rows=4)),
    "bf16_k1000_ragged": (16, 1000, 48, jnp.bfloat16, "outliers_first", split_gpu.SplitConfig(max_rows=4, e4m3="cvt")),
    "f32_no_outliers": (8, 256, 0, jnp.float32, "random", split_gpu.SplitConfig(max_rows=8, spread_banks=False)),
    "bf16_k1000_loop": (16, 1000, 48, jnp.bfloat16, "outliers_first", split_gpu.SplitConfig(max_rows=4, loop=True)),
    "bf16_k384_loop_cvt": (32, 384, 32, jnp.bfloat16, "random",
                           split_gpu.SplitConfig(loop=True, e4m3="cvt", table_smem=True)),
}


def _perm(kind, k, k_hi, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return jnp.asarray(rng.permutation(k))
    hot = np.sort(rng.choice(k, k_hi, replace=False))  # channel_permutation's order: outliers, then the rest ascending
    return jnp.asarray(np.concatenate([hot, np.setdiff1d(np.arange(k), hot)]))


def test_split_kernel_interpret_bit_identical_to_reference():
    m, k, k_hi, dtype, perm_kind, cfg = SPLIT_CASES["bf16_small"]
    x = _adversarial(m, k, dtype)
    perm = _perm(perm_kind, k, k_hi)
    got = split_gpu.split_activation_gpu(x, split_gpu.gather_table(perm, k_hi), k_hi, cfg, interpret=True)
    _assert_split_equal(got, ref.quantize_activation(x, perm, k_hi), x)


@pytest.mark.slow  # 7-20 s each on a shared 2-core CPU (the interpreted kernel's compile)
@pytest.mark.parametrize("case", ["bf16_k384", "bf16_k1000_ragged", "bf16_k1000_loop", "bf16_k384_loop_cvt"])
def test_split_kernel_interpret_bit_identical_more_shapes(case):
    m, k, k_hi, dtype, perm_kind, cfg = SPLIT_CASES[case]
    x = _adversarial(m, k, dtype)
    perm = _perm(perm_kind, k, k_hi)
    got = split_gpu.split_activation_gpu(x, split_gpu.gather_table(perm, k_hi), k_hi, cfg, interpret=True)
    _assert_split_equal(got, ref.quantize_activation(x, perm, k_hi), x)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["f32_no_outliers"])
def test_split_kernel_interpret_bit_identical_more_cases(case):
    m, k, k_hi, dtype, perm_kind, cfg = SPLIT_CASES[case]
    x = _adversarial(m, k, dtype, nonfinite=False)
    perm = _perm(perm_kind, k, k_hi)
    got = split_gpu.split_activation_gpu(x, split_gpu.gather_table(perm, k_hi), k_hi, cfg, interpret=True)
    _assert_split_equal(got, ref.quantize_activation(x, perm, k_hi))


def test_split_kernel_rows_and_support():
    cfg = split_gpu.SplitConfig()
    assert cfg.rows(8192, 1152) == 8 and cfg.rows(8192, 4480) == 2 and cfg.rows(8191, 1152) == 1
    assert split_gpu.part_sizes(1000, 48) == (64, 1024)
    assert split_gpu.supports((64, 384), jnp.bfloat16, 32) is None
    assert "bfloat16 or float32" in split_gpu.supports((64, 384), jnp.float16, 32)
    assert "multiple of 16" in split_gpu.supports((64, 384), jnp.bfloat16, 24)
    assert "16 bytes" in split_gpu.supports((64, 300), jnp.bfloat16, 16)
    assert "default mx9" in split_gpu.supports((64, 384), jnp.bfloat16, 32, hi="mx4")
    with pytest.raises(ValueError, match="e4m3"):
        split_gpu.SplitConfig(e4m3="fast")
    tbl = split_gpu.gather_table(jnp.arange(1000), 48)
    assert tbl.shape == (64 + 1024,) and int(tbl[50]) == 1000 and int(tbl[64]) == 48 and int(tbl[-1]) == 1000
    with pytest.raises(ValueError, match="gather table"):
        split_gpu.split_activation_gpu(jnp.zeros((64, 384), jnp.bfloat16), tbl, 32, interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        split_gpu.split_activation_gpu(jnp.zeros((64, 384), jnp.bfloat16), tbl, 24, interpret=True)


def _lowered_weight(w, perm, k_hi):
    from jdq import formats
    from jdq.kernels.op import LoweredWeight

    w_hi, w_lo, s_w, _ = ref.pack_weight(w, perm, k_hi)
    return LoweredWeight(w_lo, s_w, "mixdit", w.shape[0], w.shape[1], None, {"w_hi": w_hi, "perm": perm.astype(jnp.int32)},
                         (("k_hi", k_hi), ("hi", formats.get("mx9")), ("lo", formats.get("mx6"))))


def test_op_routes_the_split(operands):
    from jdq.kernels.mixdit import api

    x, w, b, *_, perm, k_hi = operands
    lw = _lowered_weight(w, perm, k_hi)
    want = ref.quantize_activation(x, perm, k_hi)
    _assert_split_equal(api.quantize_activation(x, lw, "xla"), want)  # auto on the XLA impl: the XLA split
    _assert_split_equal(api.quantize_activation(x, lw, "xla", split="xla"), want)
    with pytest.raises(ValueError, match="split must be"):
        api.quantize_activation(x, lw, "xla", split="fused")
    with pytest.raises(ValueError, match="does not apply"):
        api.quantize_activation(x.astype(jnp.float16), lw, "gpu_interpret", split="kernel")
    # auto on the GPU impl falls back to XLA where the kernel does not apply
    _assert_split_equal(api.quantize_activation(x.astype(jnp.float16), lw, "gpu_interpret"),
                        ref.quantize_activation(x.astype(jnp.float16), perm, k_hi))


@pytest.mark.slow
def test_lowered_mixdit_linear_with_split_kernel_equals_reference(operands):
    """impl="gpu_interpret": split kernel + GEMM kernel == the XLA split + reference GEMM (float sums reordered)."""
    from jdq.kernels.mixdit import api

    x, w, b, *_, perm, k_hi = operands
    lw = _lowered_weight(w, perm, k_hi)
    xb = x.astype(jnp.bfloat16)
    _assert_split_equal(api.quantize_activation(xb, lw, "gpu_interpret"), ref.quantize_activation(xb, perm, k_hi))
    got = api.mixdit_matmul(xb, lw, b, jnp.float32, "gpu_interpret", config=Config(64, 128, 2))
    want = api.mixdit_matmul(xb, lw, b, jnp.float32, "xla", split="xla")
    assert relerr(got, want) < 1e-6  # exact products; float32 sums in another order


@pytest.mark.parametrize("k,k_hi,e4m3,loop,tsm", [(1152, 64, "cvt", False, False), (4608, 224, "cvt", False, False),
                                                   (1152, 0, "cvt", False, False), (1152, 64, "bits", False, True),
                                                   (4608, 224, "cvt", True, True), (1152, 0, "bits", True, False)])
def test_split_kernel_lowers_to_mosaic_gpu(k, k_hi, e4m3, loop, tsm):
    khp, klp = split_gpu.part_sizes(k, k_hi)
    cfg = split_gpu.SplitConfig(e4m3=e4m3, loop=loop, table_smem=tsm)
    assert lowers_to_mosaic_gpu(lambda a, t: split_gpu.split_activation_gpu(a, t, k_hi, cfg),
                                ((8192, k), jnp.bfloat16), ((khp + klp,), jnp.int32))


def test_lowered_mixdit_linear_lowers_to_two_mosaic_gpu_kernels():
    """impl="gpu" at a DiT-XL/2 proj shape: the split kernel and the GEMM kernel, no XLA split."""
    from jdq.kernels.mixdit import api

    m, k, n, k_hi = 4096, 1152, 1152, 64
    perm = jnp.arange(k, dtype=jnp.int32)
    lw = _lowered_weight(jnp.zeros((k, n), jnp.float32), perm, k_hi)

    def f(x, lw):
        return api.mixdit_matmul(x, lw, None, jnp.bfloat16, "gpu")

    text = jax.jit(f).trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), lw).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2 and text.count("stablehlo.custom_call @mosaic_gpu") == 2
