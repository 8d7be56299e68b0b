"""Why jdq rounds to E4M3 / E5M2 by arithmetic, not by a float8 dtype conversion: a check to run on each device.

``clip(v, ±max).astype(float8).astype(float32)`` would be one conversion instead of the exponent
arithmetic of ``jdq.formats._bits.round_to_float_grid``, and on a CPU it gives the same values for
every bf16 value and 4M random float32. On an H200 (jax 0.11.2, 2026-12-03) 95–99 % of the results
differ: with XLA's default ``xla_allow_excess_precision`` the compiled GPU program drops the
float32 → float8 → float32 round trip, so the "rounded" value is the unrounded one. This script
prints, for the current device, how many non-NaN results differ.

``python3 benchmarks/float8_convert_check.py``
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdq.formats import _bits


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


if __name__ == "__main__":
    main()
