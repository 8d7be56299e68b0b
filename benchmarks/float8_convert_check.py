"""Check on the current device that E4M3 / E5M2 rounding by dtype conversion equals the arithmetic form bit for bit (every bf16 value and 4M random float32)."""

import jax, jax.numpy as jnp, numpy as np
from jdq.formats import _bits
rng = np.random.default_rng(0)
allbf = jnp.asarray(np.arange(65536, dtype=np.uint16)).view(jnp.bfloat16).astype(jnp.float32)
v = jnp.concatenate([allbf, jnp.asarray((rng.standard_normal(1 << 22) * np.exp2(rng.integers(-30, 12, 1 << 22))).astype(np.float32))])
for e, m, mx in [(4, 3, 448.0), (5, 2, 57344.0)]:
    a = np.asarray(jax.jit(lambda v: _bits.round_to_float_grid(v, e, m, mx, "even", False))(v))
    b = np.asarray(jax.jit(lambda v: _bits.round_to_float_grid(v, e, m, mx, "even", True))(v))
    nan = np.isnan(a)
    differ = int(((a.view(np.uint32) != b.view(np.uint32)) & ~nan).sum())
    print(f"e{e}m{m} convert vs arithmetic on {jax.devices()[0].device_kind}: {differ} of {int((~nan).sum())} non-NaN "
          f"results differ in any bit; NaN where the other is NaN: {bool(np.array_equal(nan, np.isnan(b)))} "
          f"({int(nan.sum())} NaN inputs; their payloads may differ)")
