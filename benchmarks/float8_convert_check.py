"""Why jdq rounds to E4M3 / E5M2 by arithmetic, not by a float8 dtype conversion: a check to run on each device.

``clip(v, ±max).astype(float8).astype(float32)`` would be one conversion instead of the exponent
arithmetic of ``jdq.formats._bits.round_to_float_grid``, and on a CPU it gives the same values for
every bf16 value and 4M random float32. On an H200 (jax 0.11.2, 2026-12-03) 95–99 % of the results
differ: with XLA's default ``xla_allow_excess_precision`` the compiled GPU program drops the
float32 → float8 → float32 round trip, so the "rounded" value is the unrounded one. This script
prints, for the current device, how many non-NaN results differ.

It also checks that the compiled program keeps the adder rounding of ``round_to_float_grid``
(``(|v| + c) - c``, which a compiler that reassociated float adds would turn into ``|v|``): for the
five OCP element grids, its results against the scale-round-unscale form on the device and
against ml_dtypes' conversion on the host.

``python3 benchmarks/float8_convert_check.py``
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdq.formats import _bits  # noqa: E402


GRIDS = [(4, 3, 448.0), (5, 2, 57344.0), (2, 3, 7.5), (3, 2, 28.0), (2, 1, 6.0)]
ML_DTYPES = {(4, 3): ml_dtypes.float8_e4m3fn, (5, 2): ml_dtypes.float8_e5m2, (2, 3): ml_dtypes.float6_e2m3fn,
             (3, 2): ml_dtypes.float6_e3m2fn, (2, 1): ml_dtypes.float4_e2m1fn}


def _differ(a, b):
    nan = np.isnan(a)
    return int(((a.view(np.uint32) != b.view(np.uint32)) & ~nan).sum()), int((~nan).sum()), bool(np.array_equal(nan, np.isnan(b)))


def check_adder_rounding(v):
    """Rows (grid, results that differ from the scaled form, from ml_dtypes' conversion, non-NaN count, NaN agree)."""
    rows = []
    host = np.asarray(v)
    for e, m, mx in GRIDS:
        emin = 2 - 2 ** (e - 1)
        a = np.asarray(jax.jit(lambda v: _bits._round_to_float_grid_even(v, emin, m, mx))(v))
        b = np.asarray(jax.jit(lambda v: _bits._round_to_float_grid_scaled(v, emin, m, mx, "even"))(v))
        with np.errstate(all="ignore"):
            ref = np.clip(host, -mx, mx).astype(ML_DTYPES[(e, m)]).astype(np.float32)
        ref = np.where(np.abs(host) < 2.0**-126, np.copysign(0.0, host), ref).astype(np.float32)
        vs_ml = _differ(a, ref)[0]
        d, n, nan_ok = _differ(a, b)
        rows.append((f"e{e}m{m}", d, vs_ml, n, nan_ok))
    return rows


def main():
    """Print the count of results where the conversion differs from the arithmetic rounding."""
    rng = np.random.default_rng(0)
    allbf = jnp.asarray(np.arange(65536, dtype=np.uint16)).view(jnp.bfloat16).astype(jnp.float32)
    rand = (rng.standard_normal(1 << 22) * np.exp2(rng.integers(-30, 12, 1 << 22))).astype(np.float32)
    v = jnp.concatenate([allbf, jnp.asarray(rand)])
    for (e, m, mx), dtype in [((4, 3, 448.0), jnp.float8_e4m3fn), ((5, 2, 57344.0), jnp.float8_e5m2)]:
        a = np.asarray(jax.jit(lambda v: _bits.round_to_float_grid(v, e, m, mx, "even"))(v))
        b = np.asarray(jax.jit(lambda v: jnp.clip(v, -mx, mx).astype(dtype).astype(jnp.float32))(v))
        nan = np.isnan(a)
        differ = int(((a.view(np.uint32) != b.view(np.uint32)) & ~nan).sum())
        print(f"e{e}m{m} conversion vs arithmetic on {jax.devices()[0].device_kind}: {differ} of {int((~nan).sum())} "
              f"non-NaN results differ; NaN where the other is NaN: {bool(np.array_equal(nan, np.isnan(b)))}")
    for name, d, vs_ml, n, nan_ok in check_adder_rounding(v):
        print(f"{name} adder rounding on {jax.devices()[0].device_kind}: {d} of {n} differ from the scaled form, "
              f"{vs_ml} from ml_dtypes; NaN agree: {nan_ok}")


if __name__ == "__main__":
    main()
