"""The fused SMX fake-quant formulations (pair words, pair partner) equal the general blocked path bit for bit.

So does the MX word path (bf16 along the last axis) against the reduce path in float32.

``smx.fake_quantize`` takes a one-pass formulation for k2 = 2 (the default) that XLA fuses; the
general path (a per-sub-block reduction, also used by ``quantize``) is the definition. Inputs mix
scales over 60 octaves with NaN, ±Inf, zeros, float32 subnormals and rounding ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq.formats import _bits, mx, smx


def _adversarial(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32) * np.exp2(rng.integers(-30, 30, size=shape))
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, min(flat.size, 120), replace=False)
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-39, 2.0**-126, 2.0**-133, 0.9995, 127.5, 3e38, 1.0]
    flat[idx] = rng.choice(specials, idx.size)
    a[0] = 0.0  # an all-zero row: all-zero blocks along the last axis
    return jnp.asarray(a).astype(dtype)


def _general(x, fmt, axis):
    q, step, _, _, bad = smx._quantize_blocks(x, fmt, axis)
    out = jnp.where(bad, jnp.nan, _bits.mul_pow2(q, step))
    return smx._unlayout(out, axis, x.shape[axis]).astype(x.dtype)


OPTIONS = [{}, {"rounding": "away"}, {"shared_exponent": "rounded"}, {"microexponent": "fit"}, {"block_size": 32},
           {"block_size": 64}]  # 64: too wide for the unrolled word path, takes the partner path
CASES = [  # (shape, axis, dtype): the word path needs a 16-bit dtype, the last axis and whole blocks
    ((12, 64), 1, jnp.bfloat16),  # words
    ((12, 64), 1, jnp.float16),  # words
    ((12, 64), 1, jnp.float32),  # partner
    ((64, 12), 0, jnp.bfloat16),  # partner, weight layout
    ((6, 40, 3), 1, jnp.bfloat16),  # partner, padded middle axis
    ((6, 50), 1, jnp.bfloat16),  # partner, padded last axis
]


# MX4 has the most code words per pair: its cases take ~4x the others; they run with -m slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mx4" else n for n in sorted(smx.NAMES)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fused_paths_equal_general_path(name, options):
    fmt = smx.SMXFormat(name, smx.NAMES[name], **options)
    for i, (shape, axis, dtype) in enumerate(CASES):
        x = _adversarial(shape, dtype, seed=i)
        fast = np.asarray(jax.jit(lambda v: smx.fake_quantize(v, fmt, axis))(x).astype(jnp.float32))
        ref = np.asarray(_general(x, fmt, axis).astype(jnp.float32))
        assert fast.shape == ref.shape
        np.testing.assert_array_equal(fast, ref, err_msg=f"{shape} axis={axis} {jnp.dtype(dtype).name}")
        np.testing.assert_array_equal(np.signbit(fast), np.signbit(ref))


def test_word_path_keeps_pairs_apart_from_neighbours():
    """A pair's micro-exponent depends on its own two elements only (word halves are not mixed up)."""
    fmt = smx.SMXFormat("mx6", 4)  # m = 4; block max 1.0 -> E = 0, step 2**-3, shifted 2**-4
    x2 = jnp.asarray([[1.0, 1.0] + [0.16, 0.16] * 7], jnp.bfloat16)  # pairs 1..7 shift: 0.16 -> 3/16
    out2 = np.asarray(smx.fake_quantize(x2, fmt, 1).astype(jnp.float32))[0]
    assert out2[0] == out2[1] == 1.0
    np.testing.assert_array_equal(out2[2:], np.float32(0.1875))
    x3 = jnp.asarray([[1.0, 0.16] + [0.16, 0.16] * 7], jnp.bfloat16)  # pair 0 is not shifted: 0.16 -> 0.125
    out3 = np.asarray(smx.fake_quantize(x3, fmt, 1).astype(jnp.float32))[0]
    assert out3[1] == 0.125 and np.all(out3[2:] == np.float32(0.1875))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_per_element_width_select_equals_two_general_casts(options):
    """``fake_quantize_select`` (one pass, a width per element) == where(select, general hi, general lo), any select."""
    pairs = [("mx9", "mx6"), ("mx6", "mx4"), ("mx4", "mx9")]
    for i, (shape, axis, dtype) in enumerate(CASES):
        x = _adversarial(shape, dtype, seed=10 + i)
        # an arbitrary element mask (blocks mixed), plus whole rows of each choice
        select = np.random.default_rng(i).random(shape) < 0.45
        for hi_name, lo_name in pairs:
            hi = smx.SMXFormat(hi_name, smx.NAMES[hi_name], **options)
            lo = smx.SMXFormat(lo_name, smx.NAMES[lo_name], **options)
            got = jax.jit(lambda v, s: smx.fake_quantize_select(v, s, hi, lo, axis))(x, jnp.asarray(select))
            want = jnp.where(select, _general(x, hi, axis), _general(x, lo, axis))
            got, want = (np.asarray(a.astype(jnp.float32)) for a in (got, want))
            np.testing.assert_array_equal(got, want, err_msg=f"{hi_name}/{lo_name} {shape} axis={axis}")
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_select_of_formats_differing_beyond_width_computes_both():
    hi, lo = smx.SMXFormat("mx9", 7, block_size=32), smx.SMXFormat("mx6", 4)
    assert not smx.differ_only_in_width(hi, lo) and smx.differ_only_in_width(smx.SMXFormat("mx9", 7), lo)
    x = _adversarial((4, 64), jnp.bfloat16, seed=3)
    select = jnp.asarray(np.random.default_rng(1).random((4, 64)) < 0.5)
    got = smx.fake_quantize_select(x, select, hi, lo, 1)
    want = jnp.where(select, _general(x, hi, 1), _general(x, lo, 1))
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("name", sorted(mx.NAMES))
@pytest.mark.parametrize("options", [{}, {"rounding": "away"}, {"block_size": 16}, {"block_size": 8}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_mx_word_path_equals_reduce_path(name, options):
    """bf16 along the last axis takes 32-bit words (halves by shifts); it equals the float32 reduce path, then bf16."""
    fmt = mx.MXFormat(name, mx.NAMES[name], **options)
    for i, shape in enumerate([(12, 64), (3, 5, 96)]):
        x = _adversarial(shape, jnp.bfloat16, seed=10 + i)
        fast = jax.jit(lambda v: mx.fake_quantize(v, fmt, v.ndim - 1))(x)
        ref = mx.fake_quantize(x.astype(jnp.float32), fmt, x.ndim - 1).astype(jnp.bfloat16)
        assert fast.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(fast).view(np.uint16), np.asarray(ref).view(np.uint16),
                                      err_msg=f"{shape}")


def test_bf16_word_halves_round_trip():
    """The word halves are the even and the odd elements as float32, and packing them back is the identity."""
    x = _adversarial((4, 64), jnp.bfloat16, seed=3)
    lo, hi = _bits.bf16_word_halves(x, 8)
    assert lo.shape == (4, 4, 8)
    xf = np.asarray(x.astype(jnp.float32)).reshape(4, 32, 2)
    np.testing.assert_array_equal(np.asarray(lo).reshape(4, 32), xf[..., 0])
    np.testing.assert_array_equal(np.asarray(hi).reshape(4, 32), xf[..., 1])
    np.testing.assert_array_equal(np.asarray(_bits.bf16_from_word_halves(lo, hi, x.shape)).view(np.uint16),
                                  np.asarray(x).view(np.uint16))
