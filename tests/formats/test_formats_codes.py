"""Storage: element codes, scale bytes, bit packing and the QTensor pytree."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jdq.formats as F
from jdq.formats import _bits


@pytest.mark.parametrize("name,dt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_codes_are_the_ocp_bit_patterns(name, dt):
    """Every finite FP8 value (and NaN) quantizes, unscaled, to its own ml_dtypes bit pattern."""
    codes = np.arange(256, dtype=np.uint8)
    vals = codes.view(dt).astype(np.float32)
    finite = np.isfinite(vals)
    qt = F.quantize(jnp.asarray(vals[finite]), name, granularity=None)
    got = np.asarray(qt.codes)
    # +0 and -0 are both zero; everything else must be the identical pattern
    np.testing.assert_array_equal(got[vals[finite] != 0], codes[finite][vals[finite] != 0])
    np.testing.assert_array_equal(np.asarray(F.dequantize(qt)), vals[finite])
    nan_code = int(np.asarray(F.quantize(jnp.float32(np.nan)[None], name, granularity=None).codes)[0])
    assert np.isnan(np.uint8(nan_code).view(dt).astype(np.float32))


@pytest.mark.parametrize("name,dt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_unscaled_fp8_cast_equals_saturating_ml_dtypes_cast(name, dt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp2(rng.uniform(-20, 20, 4096))).astype(np.float32)
    max_normal = float(ml_dtypes.finfo(dt).max)
    ref = np.clip(x, -max_normal, max_normal).astype(dt).astype(np.float32)
    ref = np.where(np.abs(x) < 2.0**-126, 0, ref)  # float32 subnormals flush (XLA)
    np.testing.assert_array_equal(np.asarray(F.cast(jnp.asarray(x), name, granularity=None)), ref)


@pytest.mark.parametrize("ebits,mbits", [(4, 3), (5, 2), (3, 2), (2, 3), (2, 1)])
def test_small_float_codes_roundtrip(ebits, mbits):
    """decode then encode is the identity on every code (−0 aside), for every OCP element type."""
    n = 1 << (1 + ebits + mbits)
    codes = jnp.arange(n, dtype=jnp.int32)
    vals, back = jax.jit(lambda c: (_bits.decode_float(c, ebits, mbits),
                                    _bits.encode_float(_bits.decode_float(c, ebits, mbits), ebits, mbits)))(codes)
    if ebits >= 4:  # FP8 has NaN/Inf codes; they are not element values of MX
        ok = np.isfinite(np.asarray((codes.astype(np.uint8)).view(
            ml_dtypes.float8_e4m3fn if ebits == 4 else ml_dtypes.float8_e5m2).astype(np.float32)))
    else:
        ok = np.ones(n, bool)
    back = np.asarray(back)
    neg_zero = np.asarray(codes) == (1 << (ebits + mbits))
    np.testing.assert_array_equal(back[ok & ~neg_zero], np.asarray(codes)[ok & ~neg_zero])
    # the decoded values are sorted by code within each sign (monotone encoding)
    pos = np.asarray(vals)[: n // 2][ok[: n // 2]]
    assert (np.diff(pos) > 0).all()


def test_int4_packs_two_per_byte_low_nibble_first():
    x = jnp.asarray(np.arange(-7, 9, dtype=np.float32).reshape(1, 16))  # amax 8 -> scale 8/7
    qt = F.quantize(x, "int4", granularity="row")
    codes = np.asarray(qt.codes)[0].astype(np.int64)
    packed = np.asarray(F.quantize(x, "int4", granularity="row", pack=True).codes)[0]
    assert packed.dtype == np.uint8 and packed.shape == (8,)
    expected = (codes[0::2] & 0xF) | ((codes[1::2] & 0xF) << 4)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(np.asarray(F.unpack(F.pack(qt)).codes), np.asarray(qt.codes))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_pack_bits_roundtrip_any_width(bits, signed):
    rng = np.random.default_rng(bits)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    if signed and bits == 1:
        pytest.skip("1-bit codes are unsigned")
    codes = rng.integers(lo, hi, size=(3, 13, 5)).astype(np.int8 if signed else np.uint8)
    for axis in (0, 1, 2):
        packed = F.pack_bits(jnp.asarray(codes), bits, axis)
        n = codes.shape[axis]
        unit = 8 // np.gcd(8, bits)
        assert packed.shape[axis] == -(-n // unit) * unit * bits // 8
        back = F.unpack_bits(packed, bits, n, axis, signed=signed)
        np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "mx9", "mx6", "mx4", "int3", "int4"])
def test_qtensor_fields_and_packed_bytes(name):
    x = jax.random.normal(jax.random.key(1), (4, 70)) * 3  # 70: padded to whole blocks
    spec = F.get(name)
    qt = F.quantize(x, name)
    assert qt.codes.shape == x.shape and qt.shape == x.shape and qt.axis == 1 and not qt.packed
    if spec.kind in ("mx", "smx"):
        assert qt.scale.dtype == jnp.uint8 and qt.scale.shape == (4, -(-70 // spec.block_size))
    if spec.kind == "smx":
        assert qt.micro.shape == (4, -(-70 // 16) * 8) and set(np.unique(qt.micro)) <= {0, 1}
    qp = F.pack(qt)
    b = spec.element_bits
    unit = 8 // np.gcd(8, b)  # codes per whole number of bytes
    per_row_code_bytes = -(-70 // unit) * unit * b // 8 if b < 8 else 70
    assert qp.codes.shape == (4, per_row_code_bytes)
    np.testing.assert_array_equal(F.dequantize(qp), F.cast(x, name))
    # a QTensor is a pytree: arrays are leaves, the format is static metadata
    leaves, tree = jax.tree_util.tree_flatten(qp)
    assert all(isinstance(l, jax.Array) for l in leaves)
    same = jax.jit(lambda q: q)(qp)
    assert same.fmt == spec and same.packed and same.shape == (4, 70)
    np.testing.assert_array_equal(F.dequantize(same, jnp.float32), F.cast(x, name))


def test_mx_scale_bytes_are_e8m0():
    x = jnp.asarray(np.array([[0.0] * 32, [1.0] + [0.0] * 31, [448.0 * 4] + [0.0] * 31], np.float32))
    qt = F.quantize(x, "mxfp8_e4m3")
    # E = floor(log2 amax) - 8: zero block -> byte 0 (2**-127); 1.0 -> 2**-8 -> 119; 1792 -> 2**2 -> 129
    np.testing.assert_array_equal(np.asarray(qt.scale)[:, 0], [0, 119, 129])


def test_dequantize_rejects_non_qtensor():
    with pytest.raises(TypeError, match="QTensor"):
        F.dequantize(jnp.zeros(3))
