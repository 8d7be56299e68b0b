"""LayerNorm + adaLN modulation + per-token quantization: reference == the model's ops + token quantization,
the GPU kernel in interpret mode bit-exact with the reference, the real kernel lowers to Mosaic GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu, normalization_bound

from jdq.kernels.norm_quant.gpu import Config, norm_quantize_rows_gpu
from jdq.kernels.norm_quant.ref import modulated_norm, norm_quantize_rows
from jdq.kernels.token_quant.ref import quantize_rows
from jdq.models.layers import layer_norm, modulate


def _operands(m, k, group_rows, dtype, key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    x = (jax.random.normal(k1, (m, k)) * 3 + jnp.linspace(-2, 2, k)).astype(dtype)
    g = m // group_rows
    shift = (jax.random.normal(k2, (g, k)) * 0.5).astype(dtype)
    scale = (jax.random.normal(k3, (g, k)) * 0.5).astype(dtype)
    return x, shift, scale


def _h_bound(x, shift, scale, group_rows):
    """Bound on |h − h'| for two float32 evaluations of the modulated norm (summation orders differ)."""
    rep = lambda a: np.repeat(np.asarray(a, np.float64), group_rows, axis=0)  # noqa: E731
    return normalization_bound(np.asarray(x, np.float32), (-1,), 1 + rep(scale), rep(shift), eps=1e-6)


def test_reference_is_the_model_norm_in_float32():
    # float32: the model's layer_norm + modulate round nothing in between, so only the summation
    # order of mean / variance can differ (and 1 + scale is rounded once on both sides)
    x, shift, scale = _operands(32, 256, 16, jnp.float32)
    want = modulate(layer_norm(x.reshape(2, 16, 256)), shift, scale).reshape(32, 256)
    got = np.asarray(modulated_norm(x, shift, scale, 16), np.float64)
    assert np.all(np.abs(got - np.asarray(want, np.float64)) <= _h_bound(x, shift, scale, 16))
    q, s = norm_quantize_rows(x, shift, scale, 16)
    q2, s2 = quantize_rows(modulated_norm(x, shift, scale, 16))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q2))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s2))


@pytest.mark.parametrize("fmt,dtype,reg_elems", [("int8", jnp.bfloat16, 96), ("fp8_e4m3", jnp.bfloat16, 96),
                                                 ("int8", jnp.float32, 96), ("int8", jnp.bfloat16, 0)])
def test_gpu_kernel_interpret_matches_reference(fmt, dtype, reg_elems):
    # 8 rows per CTA (4 CTAs, 2 samples); reg_elems=0: the shared-memory passes instead of registers
    x, shift, scale = _operands(32, 256, 16, dtype, key=1)
    cfg = Config(smem_bytes=8 * 1024, reg_elems=reg_elems)
    q, s = norm_quantize_rows_gpu(x, shift, scale, 16, fmt=fmt, config=cfg, interpret=True)
    q2, s2 = norm_quantize_rows(x, shift, scale, 16, fmt=fmt)
    assert q.dtype == q2.dtype
    _assert_same_quantization_up_to_summation_order(x, shift, scale, (q, s), (q2, s2), fmt)


def _e4m3_min_spacing(g):
    """The smaller of the E4M3 grid spacings on either side of grid values ``g`` (subnormal spacing 2^-9)."""
    a = np.abs(g)
    e = np.floor(np.log2(np.maximum(a, 2.0**-6)))
    below = np.where((a == 2.0**e) & (e > -6), 2.0 ** (e - 4), 2.0 ** (e - 3))
    return np.where(a < 2.0**-6, 2.0**-9, below)


def _assert_same_quantization_up_to_summation_order(x, shift, scale, got, want, fmt):
    """The kernel's codes/scales equal the reference's except where the summation order can decide.

    Kernel and reference sum mean and variance in different orders, so their float32 h may differ
    by dh (normalization_bound); a bf16 h is rounded on each side, which either hides that
    difference (no bf16 rounding boundary within ±dh of the float32 h: identical bf16 h) or turns it
    into one bf16 spacing. A row's scale amax·float32(1/qmax) is identical when its amax is; a code
    is identical when the reference's h·(1/s) lies farther than dh·(1/s) (plus two ulps of the
    product) from a rounding boundary of the grid. Everywhere, each dequantized value lies within
    half a grid step of its own h.
    """
    (q, s), (q2, s2) = got, want
    f32 = jnp.float32
    h32 = np.asarray(modulated_norm(x.astype(f32), shift, scale, 16), np.float64)  # the reference's h before rounding
    dh = _h_bound(x, shift, scale, 16)
    h = h32
    if x.dtype == jnp.bfloat16:
        to_bf16 = lambda a: np.asarray(jnp.asarray(a, f32).astype(jnp.bfloat16), np.float64)  # noqa: E731
        h = to_bf16(h32)
        dh = np.abs(to_bf16(h32 + dh) - to_bf16(h32 - dh))  # 0 where both sides must round to the same bf16
    qmax = 127 if fmt == "int8" else 448
    s, s2 = np.asarray(s, np.float64), np.asarray(s2, np.float64)
    d_amax = dh.max(axis=-1)  # a row maximum moves no more than its elements
    assert np.all(np.abs(s - s2) <= d_amax / qmax * (1 + 2**-22))
    assert np.all((s == s2) | (d_amax > 0))
    c, c2 = np.asarray(q.astype(f32), np.float64), np.asarray(q2.astype(f32), np.float64)
    v = h / s2[:, None]  # what the reference rounded (to ~1 ulp)
    ulp2 = 2 * np.abs(v) * 2.0**-23
    if fmt == "int8":
        margin = np.abs(np.abs(v) - np.floor(np.abs(v)) - 0.5)
        half_steps = (s + s2)[:, None] / 2
    else:
        margin = _e4m3_min_spacing(c2) / 2 - np.abs(v - c2)
        e = np.floor(np.log2(np.maximum(np.maximum(np.abs(c), np.abs(c2)), 2.0**-6)))
        half_steps = 2.0 ** (e - 4) * np.maximum(s, s2)[:, None] * 2
    decided = (s == s2)[:, None] & (margin > dh / s2[:, None] + ulp2)
    np.testing.assert_array_equal(c[decided], c2[decided])
    assert decided.mean() > 0.5  # the exact comparison covers most elements (not vacuous)
    assert np.all(np.abs(c * s[:, None] - c2 * s2[:, None]) <= dh + half_steps)


def test_rows_per_cta_stay_inside_a_sample():
    cfg = Config()
    assert cfg.rows(16384, 1152, 2, 256) == 16
    assert cfg.rows(16384, 1152, 2, 8) == 8
    assert not cfg.supports(16384, 1152, 2, 6)  # 6 tokens per sample: no power-of-two row block


@pytest.mark.parametrize("fmt,m,k,group", [("int8", 16384, 1152, 256), ("fp8_e4m3", 4096, 1152, 4096)])
def test_gpu_kernel_lowers_to_mosaic_gpu(fmt, m, k, group):
    fn = functools.partial(norm_quantize_rows_gpu, group_rows=group, fmt=fmt)
    g = m // group
    assert lowers_to_mosaic_gpu(fn, ((m, k), jnp.bfloat16), ((g, k), jnp.bfloat16), ((g, k), jnp.bfloat16))


def test_bad_inputs_raise():
    x = jnp.ones((32, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="whole number of groups"):
        norm_quantize_rows(x, jnp.ones((3, 128)), jnp.ones((3, 128)), 5)
    with pytest.raises(ValueError, match="one row per sample"):
        norm_quantize_rows(x, jnp.ones((2, 128)), jnp.ones((2, 128)), 8)
    with pytest.raises(ValueError, match="do not fit"):
        norm_quantize_rows_gpu(jnp.ones((32, 100), jnp.bfloat16), jnp.ones((2, 100)), jnp.ones((2, 100)), 16,
                               interpret=True)
