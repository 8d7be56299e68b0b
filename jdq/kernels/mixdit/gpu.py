"""MixDiT mixed-precision GEMM for Hopper in Mosaic GPU: bf16 WGMMA on the outlier part, FP8 on the rest.

Computes :func:`jdq.kernels.mixdit.ref.mixdit_matmul` (see that module for why MX9 maps onto bf16
and MX6 onto E4M3 exactly). One warpgroup per CTA, a (M/tile_m, N/tile_n) grid, two pipelines
over K in one kernel: the outlier range (``x_hi``, ``w_hi``: bf16, K tiles of 64, B K-major
through a transposed view) into one float32 accumulator, then the MX6 range (``x_lo``, ``w_lo``:
E4M3, K tiles of 128) into a second; the epilogue computes ``acc_hi + acc_lo · s_x · s_w + b``,
casts and stores by TMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (bcast_vec, kmajor_operand, kmajor_spec, pl, plgpu, rhs_kmajor, smem_transforms,
                               store_tile, tiled_kernel)
from jdq.kernels.mixdit.ref import HI_TILE, LO_TILE


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the MixDiT GPU kernel."""

    tile_m: int = 128
    tile_n: int = 128
    stages: int = 2

    def supports(self, m: int, n: int) -> bool:
        """Whether M and N are multiples of the tiles."""
        return m % self.tile_m == 0 and n % self.tile_n == 0


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def mixdit_matmul_gpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, b=None, out_dtype=jnp.bfloat16, config: Config = Config(),
                      interpret=False):
    """``x_hi·w_hiᵀ + (x_lo·w_loᵀ)·s_x·s_w + b`` with bf16 hi operands and E4M3 lo operands (see the module docstring)."""
    m, k_lo = x_lo.shape
    n = w_lo.shape[0]
    k_hi = x_hi.shape[1]
    if x_lo.dtype != jnp.float8_e4m3fn or w_lo.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"mixdit: x_lo and w_lo must be float8_e4m3fn, got {x_lo.dtype}, {w_lo.dtype}")
    if x_hi.dtype != jnp.bfloat16 or w_hi.dtype != jnp.bfloat16:
        raise TypeError(f"mixdit: x_hi and w_hi must be bfloat16, got {x_hi.dtype}, {w_hi.dtype}")
    if w_lo.shape != (n, k_lo) or w_hi.shape != (n, k_hi) or x_hi.shape[0] != m:
        raise ValueError(f"mixdit: shapes x_hi {x_hi.shape}, x_lo {x_lo.shape}, w_hi {w_hi.shape}, w_lo {w_lo.shape} disagree")
    if k_hi % HI_TILE or k_lo % LO_TILE or k_lo == 0:
        raise ValueError(f"mixdit: K_hi={k_hi} must be a multiple of {HI_TILE}, K_lo={k_lo} a positive multiple of {LO_TILE}")
    if s_x.shape != (m,) or s_w.shape != (n,):
        raise ValueError(f"mixdit: scales s_x {s_x.shape}, s_w {s_w.shape}; want ({m},), ({n},)")
    if not config.supports(m, n):
        raise ValueError(f"mixdit: M={m} N={n} are not multiples of the tiles of {config}")
    b = jnp.zeros((n,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    out_dtype = jnp.dtype(out_dtype)
    tm, tn = config.tile_m, config.tile_n
    tile = (tm, tn)
    hi_tr = smem_transforms(HI_TILE, jnp.bfloat16, interpret)
    lo_tr = smem_transforms(LO_TILE, jnp.float8_e4m3fn, interpret)

    def body(xh_g, xl_g, wh_g, wl_g, sx_g, sw_g, b_g, o_g, o_s):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")

        def run(x_g, w_g, tk, tr, acc_dtype=jnp.float32):
            def scope(acc):
                def step(_, x_s, w_s):
                    plgpu.wgmma(acc, x_s, rhs_kmajor(w_s, interpret))
                    plgpu.wgmma_wait(0)

                specs = [plgpu.BlockSpec((tm, tk), lambda kk: (mi, kk), transforms=tr),
                         kmajor_spec(tn, tk, lambda kk: (ni, kk), tr, interpret)]
                plgpu.emit_pipeline(step, grid=(x_g.shape[1] // tk,), in_specs=specs,
                                    max_concurrent_steps=config.stages)(x_g, w_g)
                return acc[...]

            return pl.run_scoped(scope, plgpu.ACC(tile, acc_dtype))

        y = run(xl_g, wl_g, LO_TILE, lo_tr)
        y = y * bcast_vec(sx_g, mi * tm, tile, 0, interpret)
        y = y * bcast_vec(sw_g, ni * tn, tile, 1, interpret)
        if k_hi:
            y = run(xh_g, wh_g, HI_TILE, hi_tr) + y
        y = y + bcast_vec(b_g, ni * tn, tile, 1, interpret)
        store_tile(y, o_s, o_g, mi, ni)

    if k_hi == 0:  # keep the operand list fixed: a dummy (never read) hi tile
        x_hi = jnp.zeros((m, HI_TILE), jnp.bfloat16)
        w_hi = jnp.zeros((n, HI_TILE), jnp.bfloat16)
    wh, wl = kmajor_operand(w_hi, interpret), kmajor_operand(w_lo, interpret)
    return tiled_kernel(body, m, n, tm, tn, out_dtype, interpret=interpret)(
        x_hi, x_lo, wh, wl, jnp.asarray(s_x, jnp.float32), jnp.asarray(s_w, jnp.float32), b)


__all__ = ["Config", "mixdit_matmul_gpu"]
