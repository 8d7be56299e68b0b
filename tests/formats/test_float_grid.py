"""``round_to_float_grid`` (the element rounding of FP8 and OCP MX FP casts) against a float64 NumPy reference.

The ties-to-even path rounds with the float32 adder (``(|v| + c) - c``), the ties-away path by
scaling to an integer grid; both must give, bit for bit, the value of the textbook definition for
every bf16 value and for random float32 over a wide range of exponents.
"""

import jax
import numpy as np
import pytest

import ml_dtypes

from jdq.formats import _bits

FORMATS = [(4, 3, 448.0), (5, 2, 57344.0), (2, 3, 7.5), (3, 2, 28.0), (2, 1, 6.0)]


def _inputs():
    rng = np.random.default_rng(7)
    allbf = np.arange(65536, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    rand = (rng.standard_normal(1 << 18) * np.exp2(rng.integers(-30, 20, 1 << 18))).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    return np.concatenate([allbf, rand, special])


@np.errstate(all="ignore")
def _reference(v, ebits, mbits, max_norm, rounding):
    x = v.astype(np.float64)
    emin = 2 - 2 ** (ebits - 1)
    mag = np.abs(x)
    e = np.maximum(np.floor(np.log2(np.where(mag > 0, mag, 1.0))), emin)
    step = np.exp2(e - mbits)
    t = np.where(np.isfinite(x), x / step, 0.0)
    r = np.round(t) if rounding == "even" else np.sign(t) * np.floor(np.abs(t) + 0.5)
    q = np.clip(r * step, -max_norm, max_norm)
    q = np.where(np.isinf(x), np.sign(x) * max_norm, q)
    q = np.where(np.abs(x) < 2.0**-126, np.copysign(0.0, x), q)  # XLA flushes float32 subnormals
    return np.where(np.isnan(x), np.nan, q).astype(np.float32)


@pytest.mark.parametrize("rounding", ["even", "away"])
@pytest.mark.parametrize("ebits,mbits,max_norm", FORMATS)
def test_round_to_float_grid_matches_the_definition(ebits, mbits, max_norm, rounding):
    v = _inputs()
    got = np.asarray(jax.jit(lambda v: _bits.round_to_float_grid(v, ebits, mbits, max_norm, rounding))(v))
    want = _reference(v, ebits, mbits, max_norm, rounding)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bad = np.flatnonzero(got[~nan].view(np.uint32) != want[~nan].view(np.uint32))
    assert bad.size == 0, f"{bad.size} differ, e.g. v={v[~nan][bad[:4]]} got={got[~nan][bad[:4]]} want={want[~nan][bad[:4]]}"


ML_DTYPES = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float6_e2m3fn, ml_dtypes.float6_e3m2fn,
             ml_dtypes.float4_e2m1fn]


def test_even_equals_ml_dtypes_conversion():
    """Ties to even on each grid is what ml_dtypes' conversion to that float type gives (saturated first)."""
    v = _inputs()
    v = v[np.isfinite(v)]
    for (e, m, mx), dt in zip(FORMATS, ML_DTYPES):
        got = np.asarray(jax.jit(lambda v: _bits.round_to_float_grid(v, e, m, mx, "even"))(v))
        want = np.clip(v, -mx, mx).astype(dt).astype(np.float32)
        want = np.where(np.abs(v) < 2.0**-126, np.copysign(0.0, v), want).astype(np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
